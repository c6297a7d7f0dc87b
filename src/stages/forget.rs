//! `tessera forget`: erasing a person (GDPR Art. 17, CCPA) from everything under the output,
//! and keeping them out of every later run.
//!
//! A request names identifiers as `TYPE:VALUE`. Each is expanded to its person: the profile
//! `identity_graph` gives it, the profiles merged into that one, and every identifier of those
//! profiles. A row belongs to the person when any of its text (plain columns, list and struct
//! members, and every value inside JSON text such as `traits`) is one of the person's profile
//! ids or message_ids, or normalises to one of their identifiers: a column or JSON key named
//! after an identifier type is normalised as that type, any value with an `@` as an email.
//!
//! Every table holding such rows gets a new version without them (published all at once, like
//! a run's tables). Then each table's history is cut to that version: data files no longer
//! referenced are deleted at once (not after `run.retention_hours`), a checkpoint is written at
//! the current version and every older log entry and checkpoint is deleted, so no old `add`
//! action's column statistics (min/max strings) keep a value either.
//!
//! Their identifiers are kept only as SHA-256 digests of the normalised value, in
//! `_state/suppressed`: each run drops events whose identifiers hash to one of them before
//! they reach the event history ([`Suppression`]), so neither an incremental run, a `--full`
//! run nor a redelivered file brings the person back. `forget_requests` records each request
//! with the digests and the rows deleted per table, never a value in clear.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema};
use chrono::{DateTime, Utc};
use datafusion::dataframe::DataFrame;
use datafusion::logical_expr::{cast, col, lit, ColumnarValue, Expr, Volatility};
use futures::StreamExt;
use object_store::ObjectStoreExt;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::output::{Outputs, WriteMode};
use crate::stages::identity::graph::Rules;
use crate::tables;
use crate::tables::timestamp_type;

/// Digests of the identifiers of forgotten people: `identifier_type, identifier_sha256`.
pub const SUPPRESSED: &str = crate::tables::state::SUPPRESSED;

/// The SHA-256 of `value`, as the 32 bytes.
pub fn digest(value: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(&Sha256::digest(value.as_bytes()));
    out
}

/// The SHA-256 of `value` in lowercase hex: how `_state/suppressed` and `forget_requests` keep
/// an identifier (of its normalised value).
pub fn digest_hex(value: &str) -> String {
    hex(&digest(value))
}

fn hex(bytes: &[u8; 32]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// One `TYPE:VALUE` of a request, with where it was given (for error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// `argument 2`, or `people.txt line 4`.
    pub at: String,
    /// The text as given.
    pub text: String,
}

/// Splits `TYPE:VALUE` at its first colon (values may hold colons; type names cannot).
pub fn split_spec(spec: &Spec) -> Result<(&str, &str)> {
    match spec.text.split_once(':') {
        Some((kind, value)) if !kind.trim().is_empty() && !value.trim().is_empty() => {
            Ok((kind.trim(), value))
        }
        _ => Err(Error::Identifier {
            at: spec.at.clone(),
            message: format!(
                "`{}` is not TYPE:VALUE; write e.g. email:alice@example.com",
                spec.text
            ),
        }),
    }
}

/// The `TYPE:VALUE` lines of a `--from-file`: blank lines and `#` comments are skipped.
pub fn specs_from_text(file: &str, text: &str) -> Vec<Spec> {
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let line = line.trim();
            (!line.is_empty() && !line.starts_with('#')).then(|| Spec {
                at: format!("{file} line {}", i + 1),
                text: line.to_string(),
            })
        })
        .collect()
}

/// The request's identifiers: the arguments, then the lines of `from_file`.
pub fn collect_specs(args: &[String], from_file: Option<&Path>) -> Result<Vec<Spec>> {
    let mut specs: Vec<Spec> = args
        .iter()
        .enumerate()
        .map(|(i, text)| Spec {
            at: format!("argument {}", i + 1),
            text: text.clone(),
        })
        .collect();
    if let Some(file) = from_file {
        let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
        specs.extend(specs_from_text(&file.display().to_string(), &text));
    }
    if specs.is_empty() {
        return Err(Error::Usage(
            "name at least one identifier to forget: TYPE:VALUE arguments or --from-file".into(),
        ));
    }
    Ok(specs)
}

/// An identifier of a request, normalised as the data is.
#[derive(Debug, Clone)]
struct Asked {
    kind: u8,
    value: String,
}

fn parse(rules: &Rules, spec: &Spec) -> Result<Asked> {
    let (kind, raw) = split_spec(spec)?;
    let Some(t) = rules.type_index(kind) else {
        let names: Vec<&str> = rules.types.iter().map(|t| t.name.as_str()).collect();
        return Err(Error::Identifier {
            at: spec.at.clone(),
            message: format!(
                "`{kind}` is not an identifier type in [identity] (configured: {})",
                names.join(", ")
            ),
        });
    };
    // A value the rules drop (blocklisted, malformed) links nobody, but may still sit in JSON
    // text: it is suppressed as written, trimmed and lowercased.
    let value = match rules.clean(t, raw) {
        Ok(v) => v.into_owned(),
        Err(_) => raw.trim().to_lowercase(),
    };
    Ok(Asked { kind: t, value })
}

/// Finds a person's rows: digests of their identifiers by type, and values matched as they are
/// (profile ids, message_ids, identifier values). Without values in clear it is the run's
/// suppression check.
#[derive(Debug, Clone)]
pub struct Matcher {
    rules: Rules,
    /// Per identifier type (by priority index), digests of normalised values.
    digests: Vec<HashSet<[u8; 32]>>,
    /// Compared as they are, anywhere.
    clear: HashSet<String>,
    /// Identifier types normalised as emails: an `@` value anywhere is tried as one.
    email_types: Vec<u8>,
    /// Type names as they may appear as JSON keys, to skip documents that hold none.
    key_needles: Vec<String>,
}

/// Values already checked against the digests, within one batch of rows.
#[derive(Default)]
struct Memo {
    seen: std::collections::HashMap<(u8, String), bool>,
}

impl Memo {
    /// Kept small: it pays off on one person's repeated identifiers, not across a whole file.
    const MOST: usize = 16_384;
}

/// `userId`, `user_id` and `User-Id` name the same thing.
fn key_form(name: &str) -> String {
    name.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

impl Matcher {
    /// A matcher with nothing to find.
    pub fn new(rules: Rules) -> Self {
        let email_types = rules
            .types
            .iter()
            .enumerate()
            .filter(|(_, t)| t.normalize == crate::config::Normalize::Email)
            .map(|(i, _)| i as u8)
            .collect();
        let mut key_needles = Vec::new();
        for t in &rules.types {
            key_needles.push(t.name.clone());
            // `user_id` is `userId` in Segment's JSON.
            let mut camel = String::new();
            let mut up = false;
            for c in t.name.chars() {
                if c == '_' {
                    up = true;
                } else if up {
                    camel.extend(c.to_uppercase());
                    up = false;
                } else {
                    camel.push(c);
                }
            }
            key_needles.push(camel);
        }
        Matcher {
            digests: vec![HashSet::new(); rules.types.len()],
            rules,
            clear: HashSet::new(),
            email_types,
            key_needles,
        }
    }

    /// Adds the digest of a normalised value of type `t`.
    pub fn add_digest(&mut self, t: u8, digest: [u8; 32]) {
        if let Some(set) = self.digests.get_mut(t as usize) {
            set.insert(digest);
        }
    }

    /// Adds a value matched as it is, in any column.
    pub fn add_clear(&mut self, value: &str) {
        if !value.is_empty() {
            self.clear.insert(value.to_string());
        }
    }

    /// True when it can match nothing.
    pub fn is_empty(&self) -> bool {
        self.clear.is_empty() && self.digests.iter().all(HashSet::is_empty)
    }

    /// Identifier digests held.
    pub fn digest_count(&self) -> usize {
        self.digests.iter().map(HashSet::len).sum()
    }

    fn type_of_key(&self, key: &str) -> Option<u8> {
        let key = key_form(key);
        self.rules
            .types
            .iter()
            .position(|t| key_form(&t.name) == key)
            .map(|i| i as u8)
    }

    /// True when `raw`, normalised as type `t`, is one of the digests.
    fn typed(&self, t: u8, raw: &str, memo: &mut Memo) -> bool {
        let Some(set) = self.digests.get(t as usize) else {
            return false;
        };
        if set.is_empty() {
            return false;
        }
        // A person's identifiers repeat on each of their events: hash each value once.
        if let Some(&known) = memo.seen.get(&(t, raw.to_string())) {
            return known;
        }
        let found = match self.rules.clean(t, raw) {
            Ok(v) => set.contains(&digest(&v)),
            // A dropped value (blocklisted, malformed) was suppressed trimmed and lowercased.
            Err(_) => set.contains(&digest(&raw.trim().to_lowercase())),
        };
        if memo.seen.len() >= Memo::MOST {
            memo.seen.clear();
        }
        memo.seen.insert((t, raw.to_string()), found);
        found
    }

    fn leaf(&self, kind: Option<u8>, text: &str, memo: &mut Memo) -> bool {
        if self.clear.contains(text) {
            return true;
        }
        if let Some(t) = kind {
            if self.typed(t, text, memo) {
                return true;
            }
        }
        memchr::memchr(b'@', text.as_bytes()).is_some()
            && self.email_types.iter().any(|&t| self.typed(t, text, memo))
    }

    /// True when one text value (a column value, a list member) is the person's.
    pub fn value(&self, kind: Option<u8>, text: &str) -> bool {
        self.value_in(kind, text, &mut Memo::default())
    }

    fn value_in(&self, kind: Option<u8>, text: &str, memo: &mut Memo) -> bool {
        if self.leaf(kind, text, memo) {
            return true;
        }
        let start = text.trim_start();
        if !(start.starts_with('{') || start.starts_with('[')) {
            return false;
        }
        // Most documents hold no identifier: parse only those that may.
        if self.clear.is_empty()
            && memchr::memchr(b'@', text.as_bytes()).is_none()
            && !self
                .key_needles
                .iter()
                .any(|k| memchr::memmem::find(text.as_bytes(), k.as_bytes()).is_some())
        {
            return false;
        }
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(doc) => self.json(kind, &doc, memo),
            Err(_) => false,
        }
    }

    fn json(&self, kind: Option<u8>, value: &serde_json::Value, memo: &mut Memo) -> bool {
        use serde_json::Value;
        match value {
            Value::String(s) => self.leaf(kind, s, memo),
            Value::Number(n) => self.leaf(kind, &n.to_string(), memo),
            Value::Array(items) => items.iter().any(|v| self.json(kind, v, memo)),
            Value::Object(map) => map
                .iter()
                .any(|(k, v)| self.json(self.type_of_key(k).or(kind), v, memo)),
            Value::Bool(_) | Value::Null => false,
        }
    }

    /// Marks in `hits` the rows of `array` holding the person's text; `kind` is the identifier
    /// type the column is named after.
    fn column(
        &self,
        kind: Option<u8>,
        array: &ArrayRef,
        hits: &mut [bool],
        memo: &mut Memo,
    ) -> Result<()> {
        match array.data_type() {
            DataType::Utf8 => {
                let a = array.as_string::<i32>();
                for (r, hit) in hits.iter_mut().enumerate() {
                    if !*hit && a.is_valid(r) && self.value_in(kind, a.value(r), memo) {
                        *hit = true;
                    }
                }
            }
            DataType::Utf8View | DataType::LargeUtf8 | DataType::Dictionary(_, _) => {
                if let Ok(plain) = arrow::compute::cast(array, &DataType::Utf8) {
                    self.column(kind, &plain, hits, memo)?;
                }
            }
            DataType::List(_) => {
                let list = array.as_list::<i32>();
                for (r, hit) in hits.iter_mut().enumerate() {
                    if !*hit && list.is_valid(r) {
                        *hit = self.any(kind, &list.value(r), memo)?;
                    }
                }
            }
            DataType::LargeList(_) => {
                let list = array.as_list::<i64>();
                for (r, hit) in hits.iter_mut().enumerate() {
                    if !*hit && list.is_valid(r) {
                        *hit = self.any(kind, &list.value(r), memo)?;
                    }
                }
            }
            DataType::Struct(fields) => {
                let s = array.as_struct();
                for (field, child) in fields.iter().zip(s.columns()) {
                    let kind = self.rules.type_index(field.name()).or(kind);
                    self.column(kind, child, hits, memo)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn any(&self, kind: Option<u8>, array: &ArrayRef, memo: &mut Memo) -> Result<bool> {
        let mut hits = vec![false; array.len()];
        self.column(kind, array, &mut hits, memo)?;
        Ok(hits.contains(&true))
    }

    /// For each row of `columns` (named), whether it holds the person's text.
    pub fn rows(&self, columns: &[(&str, ArrayRef)], len: usize) -> Result<Vec<bool>> {
        let mut hits = vec![false; len];
        let mut memo = Memo::default();
        for (name, array) in columns {
            self.column(self.rules.type_index(name), array, &mut hits, &mut memo)?;
        }
        Ok(hits)
    }

    /// For each row of `batch`, whether it holds the person's text.
    pub fn batch(&self, batch: &RecordBatch) -> Result<Vec<bool>> {
        let schema = batch.schema();
        let columns: Vec<(&str, ArrayRef)> = schema
            .fields()
            .iter()
            .zip(batch.columns())
            .map(|(f, c)| (f.name().as_str(), c.clone()))
            .collect();
        self.rows(&columns, batch.num_rows())
    }
}

/// Columns [`Matcher`] looks into: text, lists and structs.
fn holds_text(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Utf8
            | DataType::Utf8View
            | DataType::LargeUtf8
            | DataType::Dictionary(_, _)
            | DataType::List(_)
            | DataType::LargeList(_)
            | DataType::Struct(_)
    )
}

/// An expression true for the rows of `df` that `matcher` finds; each row found adds one to
/// `found`. `None` when `df` has no column that can hold text.
fn person_rows(df: &DataFrame, matcher: Arc<Matcher>, found: Arc<AtomicU64>) -> Option<Expr> {
    let fields: Vec<(String, DataType)> = df
        .schema()
        .fields()
        .iter()
        .filter(|f| holds_text(f.data_type()))
        .map(|f| (f.name().clone(), f.data_type().clone()))
        .collect();
    if fields.is_empty() {
        return None;
    }
    let names: Vec<String> = fields.iter().map(|(n, _)| n.clone()).collect();
    let udf = datafusion::logical_expr::create_udf(
        "__tessera_person_row",
        fields.iter().map(|(_, t)| t.clone()).collect(),
        DataType::Boolean,
        // Counts what it finds: it must run once per row, never be folded or reordered.
        Volatility::Volatile,
        Arc::new(move |args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let len = arrays.first().map_or(0, |a| a.len());
            let columns: Vec<(&str, ArrayRef)> = names
                .iter()
                .map(String::as_str)
                .zip(arrays.iter().cloned())
                .collect();
            let hits = matcher
                .rows(&columns, len)
                .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
            found.fetch_add(
                hits.iter().filter(|h| **h).count() as u64,
                Ordering::Relaxed,
            );
            Ok(ColumnarValue::Array(Arc::new(BooleanArray::from(hits))))
        }),
    );
    Some(
        udf.call(
            fields
                .iter()
                .map(|(n, _)| Expr::Column(datafusion::common::Column::new_unqualified(n)))
                .collect(),
        ),
    )
}

/// A run's suppression: drops rows holding a forgotten person's identifiers before they reach
/// the event history or `rejected_events`, and counts them.
pub struct Suppression {
    matcher: Arc<Matcher>,
    dropped: Arc<AtomicU64>,
}

impl Suppression {
    /// The published `_state/suppressed` digests; `None` when nobody was forgotten.
    pub async fn load(engine: &Engine) -> Result<Option<Suppression>> {
        let rules = Rules::from_config(&engine.project.config.identity);
        let matcher = suppressed(&engine.outputs, &engine.ctx, rules).await?;
        Ok((!matcher.is_empty()).then(|| Suppression {
            matcher: Arc::new(matcher),
            dropped: Arc::new(AtomicU64::new(0)),
        }))
    }

    /// `df` without the suppressed rows (its plan still runs once: the check is per batch).
    pub fn filter(&self, df: DataFrame) -> Result<DataFrame> {
        match person_rows(&df, self.matcher.clone(), self.dropped.clone()) {
            Some(expr) => Ok(df.filter(expr.is_not_true())?),
            None => Ok(df),
        }
    }

    /// Rows dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The digests it checks.
    pub fn matcher(&self) -> &Matcher {
        &self.matcher
    }
}

/// The digests in `_state/suppressed` as a matcher (empty when there are none).
pub async fn suppressed(
    outputs: &Outputs,
    ctx: &datafusion::prelude::SessionContext,
    rules: Rules,
) -> Result<Matcher> {
    let mut matcher = Matcher::new(rules);
    let Some(df) = outputs.read(ctx, SUPPRESSED).await? else {
        return Ok(matcher);
    };
    let df = df.select(vec![
        cast(col("identifier_type"), DataType::Utf8).alias("t"),
        cast(col("identifier_sha256"), DataType::Utf8).alias("h"),
    ])?;
    for batch in df.collect().await? {
        let (t, h) = (
            batch.column(0).as_string::<i32>(),
            batch.column(1).as_string::<i32>(),
        );
        for r in 0..batch.num_rows() {
            if t.is_null(r) || h.is_null(r) {
                continue;
            }
            match (matcher.rules.type_index(t.value(r)), unhex(h.value(r))) {
                (Some(kind), Some(d)) => matcher.add_digest(kind, d),
                _ => tracing::warn!(
                    identifier_type = t.value(r),
                    "{SUPPRESSED}: a digest of a type no longer in [identity] is not checked"
                ),
            }
        }
    }
    Ok(matcher)
}

/// One identifier of a request as reported and recorded: never in clear.
#[derive(Debug, Clone, Serialize)]
pub struct AskedReport {
    /// Its type.
    #[serde(rename = "type")]
    pub kind: String,
    /// SHA-256 of its normalised value.
    pub sha256: String,
    /// Whether a profile held it.
    pub found: bool,
}

/// What a `forget` did, or with `--dry-run` would do.
#[derive(Debug, Clone, Serialize)]
pub struct ForgetReport {
    /// The request's id (also the lease holder's name while it ran).
    pub request_id: String,
    /// When it was asked.
    pub requested_at: DateTime<Utc>,
    /// True when nothing was written.
    pub dry_run: bool,
    /// The identifiers asked for.
    pub identifiers: Vec<AskedReport>,
    /// Profiles removed (the asked identifiers' and those merged into them).
    pub profiles: u64,
    /// Identifiers suppressed: the asked ones and every one linked to them.
    pub suppressed_identifiers: u64,
    /// Events of the person in the event history.
    pub events: u64,
    /// Rows deleted per table (tables with none are left out).
    pub rows_deleted: BTreeMap<String, u64>,
    /// Data files deleted: every file of an older table version, of every table.
    pub data_files_deleted: u64,
    /// `_delta_log` entries and checkpoints older than each table's current version deleted.
    pub log_entries_deleted: u64,
}

impl ForgetReport {
    /// The report as text for a person. `specs` are the identifiers as typed, in request order.
    pub fn render(&self, specs: &[Spec]) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let verb = if self.dry_run {
            "would delete"
        } else {
            "deleted"
        };
        for (spec, asked) in specs.iter().zip(&self.identifiers) {
            let _ = writeln!(
                out,
                "{} {}",
                spec.text,
                if asked.found {
                    "found"
                } else {
                    "not found (suppressed all the same)"
                }
            );
        }
        let _ = writeln!(
            out,
            "{} profile(s), {} identifier(s), {} event(s)",
            self.profiles, self.suppressed_identifiers, self.events
        );
        if self.rows_deleted.is_empty() {
            let _ = writeln!(out, "no rows to delete");
        }
        for (table, rows) in &self.rows_deleted {
            let _ = writeln!(out, "  {verb} {rows:>8} rows from {table}");
        }
        if self.dry_run {
            let _ = writeln!(out, "dry run: nothing was written");
        } else {
            let _ = writeln!(
                out,
                "deleted {} old data files and {} old log entries; request {} recorded in {}",
                self.data_files_deleted,
                self.log_entries_deleted,
                self.request_id,
                tables::FORGET_REQUESTS
            );
        }
        out
    }
}

/// Runs a forget request on `engine`'s output. Without `dry_run` it takes the run lease first
/// (failing with [`Error::Locked`] while a run holds it); a dry run writes nothing, not even
/// the lease, and reads the published tables.
pub async fn forget(engine: &Engine, specs: &[Spec], dry_run: bool) -> Result<ForgetReport> {
    let rules = Rules::from_config(&engine.project.config.identity);
    let asked: Vec<Asked> = specs
        .iter()
        .map(|s| parse(&rules, s))
        .collect::<Result<_>>()?;
    let requested_at = Utc::now();
    let request_id = format!(
        "forget-{}-{:08x}",
        requested_at.format("%Y%m%dT%H%M%SZ"),
        uuid::Uuid::new_v4().as_u128() as u32
    );
    if dry_run {
        return plan(engine, &rules, &asked, request_id, requested_at, true)
            .await
            .map(|(report, _)| report);
    }
    let place = engine.outputs.place().clone();
    crate::output::lease::check_conditional_writes(&place).await?;
    let ttl = std::time::Duration::from_secs(engine.project.config.run.lease_seconds);
    let lease = crate::output::lease::Lease::acquire(&place, &request_id, ttl).await?;
    tracing::info!(request_id = %request_id, identifiers = asked.len(), "forget started");
    let result = async {
        let finished = crate::output::publish::roll_forward(&place).await?;
        if !finished.is_empty() {
            tracing::info!(runs = ?finished, "finished an interrupted publish first");
        }
        let (mut report, work) = plan(
            engine,
            &rules,
            &asked,
            request_id.clone(),
            requested_at,
            false,
        )
        .await?;
        apply(engine, &lease, &mut report, work).await?;
        Ok(report)
    }
    .await;
    lease.release().await;
    result
}

/// What [`apply`] needs from [`plan`].
struct Work {
    matcher: Arc<Matcher>,
    /// `(type, digest)` of every identifier to suppress.
    suppress: Vec<(u8, [u8; 32])>,
}

/// Expands the request to its person and counts their rows in every table.
async fn plan(
    engine: &Engine,
    rules: &Rules,
    asked: &[Asked],
    request_id: String,
    requested_at: DateTime<Utc>,
    dry_run: bool,
) -> Result<(ForgetReport, Work)> {
    let ctx = &engine.ctx;
    let mut matcher = Matcher::new(rules.clone());
    let mut identifiers: HashSet<(u8, String)> =
        asked.iter().map(|a| (a.kind, a.value.clone())).collect();
    let mut profiles: HashSet<String> = HashSet::new();
    let mut found = vec![false; asked.len()];

    if let Some(graph) = engine.outputs.read(ctx, tables::IDENTITY_GRAPH).await? {
        let graph = graph.select(vec![
            cast(col("identifier_type"), DataType::Utf8).alias("t"),
            cast(col("identifier_value"), DataType::Utf8).alias("v"),
            cast(col("profile_id"), DataType::Utf8).alias("p"),
        ])?;
        let values: Vec<Expr> = asked.iter().map(|a| lit(a.value.clone())).collect();
        for batch in graph
            .clone()
            .filter(col("v").in_list(values, false))?
            .collect()
            .await?
        {
            let (t, v, p) = texts3(&batch);
            for r in 0..batch.num_rows() {
                for (i, a) in asked.iter().enumerate() {
                    if t.value(r) == rules.types[a.kind as usize].name && v.value(r) == a.value {
                        found[i] = true;
                        profiles.insert(p.value(r).to_string());
                    }
                }
            }
        }
        // Profiles merged into theirs were theirs too (their ids live on in old rows).
        if let Some(merges) = engine.outputs.read(ctx, tables::PROFILE_MERGES).await? {
            let merges = merges
                .select(vec![
                    cast(col("merged_profile_id"), DataType::Utf8).alias("m"),
                    cast(col("into_profile_id"), DataType::Utf8).alias("i"),
                ])?
                .collect()
                .await?;
            let mut grew = true;
            while grew {
                grew = false;
                for batch in &merges {
                    let (m, i) = (
                        batch.column(0).as_string::<i32>(),
                        batch.column(1).as_string::<i32>(),
                    );
                    for r in 0..batch.num_rows() {
                        if m.is_null(r) || i.is_null(r) {
                            continue;
                        }
                        let (m, i) = (m.value(r), i.value(r));
                        // Followed one way: what was merged into theirs was theirs.
                        if profiles.contains(i) && !profiles.contains(m) {
                            profiles.insert(m.to_string());
                            grew = true;
                        }
                    }
                }
            }
        }
        if !profiles.is_empty() {
            let ids: Vec<Expr> = profiles.iter().map(|p| lit(p.clone())).collect();
            for batch in graph
                .filter(col("p").in_list(ids, false))?
                .collect()
                .await?
            {
                let (t, v, _) = texts3(&batch);
                for r in 0..batch.num_rows() {
                    if let Some(kind) = rules.type_index(t.value(r)) {
                        identifiers.insert((kind, v.value(r).to_string()));
                    }
                }
            }
        }
    }
    let suppress: Vec<(u8, [u8; 32])> = {
        let mut all: Vec<(u8, [u8; 32])> =
            identifiers.iter().map(|(t, v)| (*t, digest(v))).collect();
        all.sort();
        all.dedup();
        all
    };
    for (t, d) in &suppress {
        matcher.add_digest(*t, *d);
    }
    for (_, v) in &identifiers {
        matcher.add_clear(v);
    }
    for p in &profiles {
        matcher.add_clear(p);
    }

    // Their events: those the identity queries tie to one of their identifiers (what gave
    // the events their profile), and any other holding one of their identifiers.
    let mut linked_events = 0;
    if let Some(history) = engine
        .outputs
        .read(ctx, crate::output::state::EVENTS)
        .await?
    {
        ctx.deregister_table(tables::EVENTS)?;
        ctx.register_table(tables::EVENTS, history.into_view())?;
        let mut message_ids: HashSet<String> = HashSet::new();
        let by_digest = matcher.clone();
        let mut memo = Memo::default();
        crate::stages::identity::event_identifiers(engine, |message_id, t, raw| {
            if by_digest.typed(t, raw, &mut memo) {
                message_ids.insert(message_id.to_string());
            }
        })
        .await?;
        for m in &message_ids {
            matcher.add_clear(m);
        }
        linked_events = message_ids.len() as u64;
    }
    let matcher = Arc::new(matcher);

    let mut rows_deleted = BTreeMap::new();
    for name in crate::output::all_tables(&engine.outputs).await? {
        if name == tables::FORGET_REQUESTS || name == SUPPRESSED {
            continue;
        }
        let Some(df) = engine.outputs.read(ctx, &name).await? else {
            continue;
        };
        let hits = Arc::new(AtomicU64::new(0));
        let Some(expr) = person_rows(&df, matcher.clone(), hits.clone()) else {
            continue;
        };
        let n = df
            .filter(expr)?
            .count()
            .await
            .map_err(|e| Error::query(name.as_str(), e))?;
        if n > 0 {
            rows_deleted.insert(name, n as u64);
        }
    }
    // The identity-linked events are among the rows found in the history; others may be too.
    let events = rows_deleted
        .get(crate::output::state::EVENTS)
        .copied()
        .unwrap_or(0)
        .max(linked_events);
    let report = ForgetReport {
        request_id,
        requested_at,
        dry_run,
        identifiers: asked
            .iter()
            .zip(&found)
            .map(|(a, f)| AskedReport {
                kind: rules.types[a.kind as usize].name.clone(),
                sha256: digest_hex(&a.value),
                found: *f,
            })
            .collect(),
        profiles: profiles.len() as u64,
        suppressed_identifiers: suppress.len() as u64,
        events,
        rows_deleted,
        data_files_deleted: 0,
        log_entries_deleted: 0,
    };
    Ok((report, Work { matcher, suppress }))
}

fn texts3(batch: &RecordBatch) -> (&StringArray, &StringArray, &StringArray) {
    (
        batch.column(0).as_string::<i32>(),
        batch.column(1).as_string::<i32>(),
        batch.column(2).as_string::<i32>(),
    )
}

/// Writes the new versions, the suppression and the record; then cuts every table's history.
async fn apply(
    engine: &Engine,
    lease: &crate::output::lease::Lease,
    report: &mut ForgetReport,
    work: Work,
) -> Result<()> {
    let ctx = &engine.ctx;
    let place = engine.outputs.place().clone();
    // Every new version is published at once, as a run's tables are: readers never see the
    // person gone from one table and still in another.
    let stage = crate::output::publish::Stage::new(&place);
    let staged = Outputs::new(stage.place().clone());
    for name in report.rows_deleted.keys() {
        let Some(df) = engine.outputs.read(ctx, name).await? else {
            continue;
        };
        let unused = Arc::new(AtomicU64::new(0));
        let Some(expr) = person_rows(&df, work.matcher.clone(), unused) else {
            continue;
        };
        let kept = df.filter(expr.is_not_true())?;
        staged.write(ctx, name, kept, WriteMode::Replace).await?;
        tracing::info!(table = %name, "rewritten without the person's rows");
    }
    let suppressed = suppressed_batch(
        &work.suppress,
        &engine_rules(engine),
        &report.request_id,
        report.requested_at,
    )?;
    staged
        .write(
            ctx,
            SUPPRESSED,
            ctx.read_batch(suppressed)?,
            WriteMode::Append,
        )
        .await?;
    // The tables' plain-Parquet manifests name the rewritten files in the same publish.
    let rewritten: Vec<String> = report.rows_deleted.keys().cloned().collect();
    crate::output::manifest::stage(&stage, &staged, &engine.outputs, &rewritten, &[], &[]).await?;
    stage.publish(&report.request_id, lease, SUPPRESSED).await?;

    // Older versions: their data files and log entries, in every table.
    for name in crate::output::all_tables(&engine.outputs).await? {
        if name == tables::FORGET_REQUESTS || name == SUPPRESSED {
            continue;
        }
        let (files, entries) = cut_history(&engine.outputs, &name).await?;
        report.data_files_deleted += files;
        report.log_entries_deleted += entries;
    }
    let record = request_batch(report)?;
    engine
        .outputs
        .write(
            ctx,
            tables::FORGET_REQUESTS,
            ctx.read_batch(record)?,
            WriteMode::Append,
        )
        .await?;
    tracing::info!(
        request_id = %report.request_id,
        files = report.data_files_deleted,
        log_entries = report.log_entries_deleted,
        "forget done"
    );
    Ok(())
}

fn engine_rules(engine: &Engine) -> Rules {
    Rules::from_config(&engine.project.config.identity)
}

/// Leaves table `name` with its current version only: deletes every data file that version
/// does not reference, writes a checkpoint of it, and deletes every older log entry and
/// checkpoint. Returns the data files and log entries deleted.
pub async fn cut_history(outputs: &Outputs, name: &str) -> Result<(u64, u64)> {
    let Some(table) = outputs.open(name).await? else {
        return Ok((0, 0));
    };
    let version = table.version().unwrap_or(0);
    let store = table.log_store().object_store(None);
    let (_, plan) = table
        .clone()
        .vacuum()
        .with_retention_period(chrono::Duration::zero())
        .with_enforce_retention_duration(false)
        .with_mode(deltalake::operations::vacuum::VacuumMode::Full)
        .with_dry_run(true)
        .await
        .map_err(|e| Error::delta(name, e))?;
    let mut files = 0;
    // As a run's clean-up: only data files named the way Tessera writes them are its to
    // delete; a file someone else put in the folder is left alone.
    for file in plan
        .files_deleted
        .into_iter()
        .filter(|f| crate::output::is_written_data_file(f))
    {
        // Removed files stay listed in the log's tombstones after they are gone.
        match store
            .delete(&object_store::path::Path::from(file.as_str()))
            .await
        {
            Ok(()) => files += 1,
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if version == 0 {
        return Ok((files, 0));
    }
    deltalake::checkpoints::create_checkpoint(&table, None)
        .await
        .map_err(|e| Error::delta(name, e))?;
    let log = object_store::path::Path::from("_delta_log");
    let mut older = Vec::new();
    let mut listing = store.list(Some(&log));
    while let Some(meta) = listing.next().await {
        let meta = meta?;
        let Some(file) = meta.location.filename() else {
            continue;
        };
        // Log entries are named by their 20-digit version: commits, checkpoints (single and
        // multi-part), compacted commits and checksums alike.
        let digits: String = file.chars().take_while(char::is_ascii_digit).collect();
        if digits.len() == 20 && digits.parse::<u64>().is_ok_and(|v| v < version) {
            older.push(meta.location.clone());
        }
    }
    let mut entries = 0;
    for path in older {
        match store.delete(&path).await {
            Ok(()) => entries += 1,
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    tracing::debug!(table = name, version, files, entries, "history cut");
    Ok((files, entries))
}

fn suppressed_batch(
    digests: &[(u8, [u8; 32])],
    rules: &Rules,
    request_id: &str,
    at: DateTime<Utc>,
) -> Result<RecordBatch> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("identifier_type", DataType::Utf8, false),
        Field::new("identifier_sha256", DataType::Utf8, false),
        Field::new("request_id", DataType::Utf8, false),
        Field::new("suppressed_at", timestamp_type(), false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            digests
                .iter()
                .map(|(t, _)| rules.types[*t as usize].name.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            digests.iter().map(|(_, d)| hex(d)),
        )),
        Arc::new(StringArray::from_iter_values(
            digests.iter().map(|_| request_id),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(
                digests.iter().map(|_| at.timestamp_micros()),
            )
            .with_timezone("UTC"),
        ),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// The `forget_requests` row of a request.
fn request_batch(report: &ForgetReport) -> Result<RecordBatch> {
    let text = |n: &str| Field::new(n, DataType::Utf8, false);
    let int = |n: &str| Field::new(n, DataType::Int64, false);
    let schema = Arc::new(Schema::new(vec![
        text("request_id"),
        Field::new("requested_at", timestamp_type(), false),
        text("identifiers"),
        int("profiles_removed"),
        int("identifiers_suppressed"),
        int("events_deleted"),
        text("rows_deleted"),
        int("rows_deleted_total"),
        int("data_files_deleted"),
        int("log_entries_deleted"),
    ]));
    let s = |v: String| Arc::new(StringArray::from(vec![v])) as ArrayRef;
    let i = |v: u64| Arc::new(Int64Array::from(vec![v as i64])) as ArrayRef;
    let json = |v: &dyn erased_json::Json| s(v.to_json());
    let columns = vec![
        s(report.request_id.clone()),
        Arc::new(
            TimestampMicrosecondArray::from(vec![report.requested_at.timestamp_micros()])
                .with_timezone("UTC"),
        ) as ArrayRef,
        json(&report.identifiers),
        i(report.profiles),
        i(report.suppressed_identifiers),
        i(report.events),
        json(&report.rows_deleted),
        i(report.rows_deleted.values().sum()),
        i(report.data_files_deleted),
        i(report.log_entries_deleted),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

mod erased_json {
    /// Serialises to JSON text (a JSON column every BI tool reads).
    pub trait Json {
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> String {
            serde_json::to_string(self).unwrap_or_else(|_| "null".into())
        }
    }
}

/// An event file that still holds events of a forgotten person.
#[derive(Debug, Clone, Serialize)]
pub struct HeldFile {
    /// Its URL.
    pub file: String,
    /// Its rows holding a suppressed identifier.
    pub rows: u64,
}

/// The event files that still hold suppressed identifiers, read on demand (only the columns
/// that can hold text; nothing is read when nobody was forgotten). Tessera cannot delete
/// them: they are the user's.
pub async fn held_files(engine: &Engine) -> Result<(u64, Vec<HeldFile>)> {
    let matcher = suppressed(&engine.outputs, &engine.ctx, engine_rules(engine)).await?;
    if matcher.is_empty() {
        return Ok((0, Vec::new()));
    }
    let inventory =
        crate::stages::ingest::discover(&engine.event_places, &[], None, &|_, _| {}).await?;
    let mut held = Vec::new();
    for file in &inventory.files {
        let df = engine
            .ctx
            .read_parquet(file.url.as_str(), Default::default())
            .await?;
        let columns: Vec<String> = df
            .schema()
            .fields()
            .iter()
            .filter(|f| holds_text(f.data_type()))
            .map(|f| f.name().clone())
            .collect();
        if columns.is_empty() {
            continue;
        }
        let names: Vec<&str> = columns.iter().map(String::as_str).collect();
        let mut stream = df.select_columns(&names)?.execute_stream().await?;
        let mut rows = 0;
        while let Some(batch) = stream.next().await {
            rows += matcher.batch(&batch?)?.iter().filter(|h| **h).count() as u64;
        }
        if rows > 0 {
            held.push(HeldFile {
                file: file.url.clone(),
                rows,
            });
        }
    }
    Ok((matcher.digest_count() as u64, held))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        let config: crate::config::IdentityConfig = toml::from_str(
            r#"
            default_country_code = "1"
            [[identifiers]]
            name = "user_id"
            [[identifiers]]
            name = "email"
            normalize = "email"
            [[identifiers]]
            name = "phone"
            normalize = "phone"
            [[identifiers]]
            name = "anonymous_id"
            "#,
        )
        .unwrap();
        Rules::from_config(&config)
    }

    fn spec(text: &str) -> Spec {
        Spec {
            at: "argument 1".into(),
            text: text.into(),
        }
    }

    #[test]
    fn type_value_splits_at_the_first_colon_and_normalises_like_the_data() {
        let r = rules();
        let a = parse(&r, &spec("email: Alice@Example.COM ")).unwrap();
        assert_eq!((a.kind, a.value.as_str()), (1, "alice@example.com"));
        let a = parse(&r, &spec("phone:(415) 555-0123")).unwrap();
        assert_eq!(a.value, "+14155550123");
        let a = parse(&r, &spec("anonymous_id:urn:device:7")).unwrap();
        assert_eq!((a.kind, a.value.as_str()), (3, "urn:device:7"));
    }

    #[test]
    fn a_malformed_or_unknown_identifier_says_where_and_how_to_fix_it() {
        let r = rules();
        for bad in ["alice@example.com", "email:", ":x", "  "] {
            let e = parse(&r, &spec(bad)).unwrap_err().to_string();
            assert!(e.starts_with("argument 1: "), "{e}");
            assert!(e.contains("TYPE:VALUE"), "{e}");
        }
        let e = parse(&r, &spec("fax:123")).unwrap_err().to_string();
        assert!(e.contains("`fax` is not an identifier type"), "{e}");
        assert!(e.contains("user_id, email, phone, anonymous_id"), "{e}");
    }

    #[test]
    fn a_file_of_identifiers_skips_blank_lines_and_comments() {
        let text = "# people who asked\n\nemail:a@b.co\n  user_id:42  \n# done\n";
        let specs = specs_from_text("people.txt", text);
        assert_eq!(
            specs,
            vec![
                Spec {
                    at: "people.txt line 3".into(),
                    text: "email:a@b.co".into()
                },
                Spec {
                    at: "people.txt line 4".into(),
                    text: "user_id:42".into()
                },
            ]
        );
    }

    #[test]
    fn digests_are_the_sha256_of_the_normalised_value() {
        // Known digests: printf 'test@example.com' | sha256sum, and of the empty string.
        assert_eq!(
            digest_hex("test@example.com"),
            "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b"
        );
        assert_eq!(
            digest_hex(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(unhex(&digest_hex("x")), Some(digest("x")));
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn digests_find_identifiers_in_columns_and_json_however_they_are_written() {
        let r = rules();
        let mut m = Matcher::new(r);
        m.add_digest(1, digest("alice@example.com"));
        m.add_digest(2, digest("+14155550123"));
        m.add_digest(0, digest("u-42"));
        // An `@` value is tried as an email wherever it is; other types by column or key name.
        assert!(m.value(None, " Alice@Example.com"));
        assert!(m.value(Some(0), "u-42"));
        assert!(!m.value(None, "u-42"));
        assert!(m.value(None, r#"{"name":"A","phone":"(415) 555-0123"}"#));
        assert!(m.value(None, r#"{"traits":{"userId":"u-42"}}"#));
        assert!(m.value(None, r#"[{"contact":"ALICE@example.com"}]"#));
        assert!(!m.value(None, r#"{"phone":"(415) 555-0124","id":"u-42"}"#));
        assert!(!m.value(None, "{not json @"));
        // Values in clear match anywhere, as they are.
        m.add_clear("p-7");
        assert!(m.value(None, "p-7"));
        assert!(m.value(None, r#"{"profiles":["p-7"]}"#));
    }

    #[test]
    fn rows_are_found_in_lists_and_structs() {
        let mut m = Matcher::new(rules());
        m.add_clear("p-7");
        let values = StringArray::from(vec!["a", "p-7", "b"]);
        let offsets = arrow::buffer::OffsetBuffer::new(vec![0, 1, 3].into());
        let lists = arrow::array::ListArray::new(
            Arc::new(Field::new("item", DataType::Utf8, true)),
            offsets,
            Arc::new(values),
            None,
        );
        let hits = m.rows(&[("ids", Arc::new(lists) as ArrayRef)], 2).unwrap();
        assert_eq!(hits, vec![false, true]);
    }
}
