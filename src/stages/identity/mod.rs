//! Identity resolution: identity SQL → links → rules and union-find → profiles with stable ids.
//!
//! ```text
//! queries/identity/*.sql ──► rows of identifiers seen together (+ seen_at, message_id)
//!        │  normalise, blocklist, intern            (graph::Resolver::add_row)
//!        ▼
//! distinct links in seen_at order ──► max_links, limits, union-find   (graph::Resolver::resolve)
//!        ▼
//! components ──► profile ids: kept from the previous identity_graph, the oldest surviving a merge
//!        ▼
//! identity_graph, identity_links, identity_conflicts, profile_merges; events gain profile_id
//! ```
//!
//! A full run resolves all links again; an incremental run resolves only the connected groups
//! of identifiers its new events reach, from the links the last run kept ([`groups`]), and
//! gives the grouping a full run gives, late data and limits included. Profile ids come from
//! the published graph either way.

pub mod accuracy;
pub mod explain;
pub mod graph;
pub mod groups;
pub mod match_state;
pub mod normalize;
pub mod probabilistic;
pub mod rounds;

// foldhash instead of SipHash: these maps hold one entry per identifier or profile (tens of
// millions at 100M events) and are probed for each.
use foldhash::{HashMap, HashMapExt};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayBuilder, ArrayRef, AsArray, RecordBatch, StringArray, StringBuilder,
    StringViewArray, TimestampMicrosecondArray, UInt8Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::{DateTime, Utc};
use datafusion::common::Column;
use datafusion::dataframe::DataFrame;
use datafusion::logical_expr::{cast, col, Expr};
use futures::StreamExt;

use crate::config::QueryFile;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::tables::timestamp_type;
use crate::tables::{self, event};
use graph::{Block, Node, Resolution, Resolver, Rules, NO_TIME};

/// The column an identity query may return to order its links.
pub const SEEN_AT: &str = "seen_at";
/// The column an identity query may return to tie its identifiers to one event.
pub const MESSAGE_ID: &str = "message_id";
/// Name shown for the built-in link query used when `queries/identity/` is empty.
pub const DEFAULT_QUERY: &str = "<default identity query>";

/// The project's identity queries in file-name order, or the default one.
pub fn load_queries(engine: &Engine) -> Result<Vec<QueryFile>> {
    let mut queries = engine.project.query_files("identity")?;
    // Record sources of probabilistic blocks are not link queries.
    let records: Vec<String> = engine
        .project
        .config
        .identity
        .probabilistic
        .iter()
        .filter_map(|b| b.query.as_ref())
        .map(|f| format!("queries/identity/{f}"))
        .collect();
    queries.retain(|q| !records.contains(&q.file.replace('\\', "/")));
    // CRM contacts link among themselves; the events' own identifiers still need a query.
    if queries.iter().all(|q| q.file.starts_with('<')) {
        queries.insert(
            0,
            QueryFile {
                file: DEFAULT_QUERY.to_string(),
                sql: default_query(&Rules::from_config(&engine.project.config.identity)),
                path: engine.project.queries_dir("identity"),
            },
        );
    }
    Ok(queries)
}

/// DESIGN.md §2: without identity queries, links come from each event's anonymous_id,
/// user_id and traits.email (those of them that are configured identifier types).
fn default_query(rules: &Rules) -> String {
    let mut columns = vec![MESSAGE_ID.to_string()];
    for (name, expr) in [
        (event::ANONYMOUS_ID, "anonymous_id"),
        (event::USER_ID, "user_id"),
        ("email", "json_get_str(traits, 'email')"),
    ] {
        if rules.type_index(name).is_some() {
            columns.push(format!("{expr} AS {name}"));
        }
    }
    columns.push(format!("\"timestamp\" AS {SEEN_AT}"));
    format!("SELECT {} FROM events", columns.join(", "))
}

/// What the identity stage produced.
pub struct IdentityTables {
    /// `identity_graph`
    pub graph: RecordBatch,
    /// `identity_links` (accepted links)
    pub links: RecordBatch,
    /// `identity_conflicts`
    pub conflicts: RecordBatch,
    /// `profile_merges` rows of this run
    pub merges: RecordBatch,
    /// How each event finds its profile.
    pub event_profiles: EventProfiles,
    /// Counts for the run log.
    pub stats: IdentityStats,
    /// Profiles whose identifiers changed since the published graph: every profile, old or
    /// new, of an identifier that is new, moved to another profile or left the graph. `None`
    /// when there is no published graph to compare with.
    pub changed_profiles: Option<Vec<String>>,
    /// `match_model`, `match_scores` and their state, when `[[identity.probabilistic]]`
    /// blocks are set.
    pub matching: Option<Matching>,
    /// The connected groups to keep for the next incremental run, when the identity queries
    /// allow resolving by groups (see [`groups`]).
    pub groups: Option<groups::Groups>,
}

/// What the probabilistic blocks produced.
pub struct Matching {
    /// `match_model`
    pub model: RecordBatch,
    /// `match_scores`
    pub scores: RecordBatch,
    /// `_state/match_model`
    pub state_model: RecordBatch,
    /// `_state/match_records`
    pub state_records: RecordBatch,
}

/// How events get their `profile_id` once identities are resolved.
pub enum EventProfiles {
    /// Rows of message_id → profile, for identity queries that are not plain projections of
    /// `events` (filters, joins, several queries with message_id): memory grows with events.
    Mapping(Vec<RecordBatch>),
    /// The identity query's identifier expressions (type, expression), evaluated again on each
    /// event as it streams and looked up in the graph: nothing is kept per event.
    Direct(Vec<(u8, Expr)>),
}

/// Counts for `runs` and the summary.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct IdentityStats {
    /// Identifiers in `identity_graph`.
    pub identifiers: u64,
    /// Distinct profiles.
    pub profiles: u64,
    /// Links applied.
    pub links_accepted: u64,
    /// Links refused (rows of `identity_conflicts`).
    pub links_refused: u64,
    /// Profiles merged into older ones this run.
    pub profiles_merged: u64,
    /// Events given a profile.
    pub events_with_profile: u64,
}

/// Per-event identifiers collected while reading rows that carry a message_id.
#[derive(Default)]
struct EventIds {
    message_ids: Vec<StringArray>,
    builder: Option<StringBuilder>,
    nodes: Vec<Node>,
    ends: Vec<u32>,
}

impl EventIds {
    const CHUNK: usize = 65_536;

    fn push(&mut self, message_id: &str, nodes: &[Node]) {
        let b = self.builder.get_or_insert_with(StringBuilder::new);
        b.append_value(message_id);
        self.nodes.extend_from_slice(nodes);
        self.ends.push(self.nodes.len() as u32);
        if b.len() >= Self::CHUNK {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if let Some(mut b) = self.builder.take() {
            if b.len() > 0 {
                self.message_ids.push(b.finish());
            }
        }
    }

    /// Adds `other`'s events, whose nodes `nodes` maps to this graph's (see
    /// [`Resolver::absorb`]).
    fn absorb(&mut self, mut other: EventIds, nodes: &[Node]) {
        self.flush();
        other.flush();
        let offset = self.nodes.len() as u32;
        self.nodes
            .extend(other.nodes.iter().map(|&n| nodes[n as usize]));
        self.ends.extend(other.ends.iter().map(|&e| e + offset));
        self.message_ids.append(&mut other.message_ids);
    }
}

/// Reads one identity query's rows: each partition of its plan on its own task, into its own
/// resolver (and its events' nodes, with `keep_events`), so identifiers are cleaned and
/// interned on every core; the caller merges them with [`Resolver::absorb`]. Read through
/// one stream, the interning ran on one core while the other mostly waited.
async fn read_links(
    df: DataFrame,
    file: &str,
    rules: &Rules,
    query: u16,
    keep_events: bool,
) -> Result<Vec<(Resolver, EventIds)>> {
    // Without a mapping to build, no message_id is needed: not decoding them saves a tenth
    // of the reading.
    let df = if keep_events || !df.schema().has_column_with_unqualified_name(MESSAGE_ID) {
        df
    } else {
        df.drop_columns(&[MESSAGE_ID])
            .map_err(|e| Error::query(file, e))?
    };
    let schema = df.schema().as_arrow().clone();
    let streams = df
        .execute_stream_partitioned()
        .await
        .map_err(|e| Error::query(file, e))?;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, stream) in streams.into_iter().enumerate() {
        let (schema, rules, file) = (schema.clone(), rules.clone(), file.to_string());
        tasks.spawn(async move {
            let mut resolver = Resolver::new(rules.clone());
            let mut events = EventIds::default();
            let (mut nodes, mut ends) = (Vec::new(), Vec::new());
            // A batch at a time: the resolver cleans and hashes a batch's values, then
            // interns them with the next ones' memory prefetched (see Resolver::add_block).
            read_blocks(stream, &schema, &file, &rules, |block, messages| {
                resolver.add_block(block, query, &mut nodes, &mut ends);
                if let (Some(m), true) = (messages, keep_events) {
                    let mut start = 0;
                    for (r, &end) in ends.iter().enumerate() {
                        if let Some(id) = m.get(r) {
                            events.push(id, &nodes[start..end as usize]);
                        }
                        start = end as usize;
                    }
                }
            })
            .await?;
            Ok::<_, Error>((i, resolver, events))
        });
    }
    let mut parts = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let part = done.map_err(|e| {
            Error::query(
                file,
                format!("reading the identity query's rows stopped: {e}"),
            )
        })??;
        parts.push(part);
    }
    tracing::debug!(file, parts = parts.len(), "identity: rows read");
    // Partition order, so a run's node numbers do not depend on which task ended first.
    parts.sort_unstable_by_key(|(i, _, _)| *i);
    Ok(parts.into_iter().map(|(_, r, e)| (r, e)).collect())
}

/// Runs the identity queries, resolves, and builds the identity tables.
/// With `full`, probabilistic blocks train again and score every pair instead of reusing the
/// model the last run kept. With `new_events` (an incremental run), only the groups the new
/// events reach are resolved again when the kept groups allow it (see [`groups`]).
pub async fn resolve(
    engine: &Engine,
    run_id: &str,
    now: DateTime<Utc>,
    full: bool,
    new_events: Option<&groups::NewEvents>,
) -> Result<IdentityTables> {
    if let Some(new) = new_events {
        match groups::resolve(engine, run_id, now, new).await {
            Ok(Ok(tables)) => return Ok(tables),
            Ok(Err(why)) => tracing::info!(why = %why, "identity: resolving every group"),
            // The kept groups are an optimisation: whatever stops them, a resolution of
            // everything gives the same tables.
            Err(e) => tracing::info!(why = %e, "identity: resolving every group"),
        }
    }
    let rules = Rules::from_config(&engine.project.config.identity);
    let queries = load_queries(engine)?;
    let started = std::time::Instant::now();
    let mut event_sources = 0;
    let mut frames = Vec::with_capacity(queries.len());
    for query in &queries {
        let df = link_frame(engine, query, &rules).await?;
        event_sources += usize::from(df.schema().has_column_with_unqualified_name(MESSAGE_ID));
        frames.push(df);
    }
    let direct = direct_identifiers(engine, &queries, event_sources, &rules).await?;
    let mut read: Option<(Resolver, EventIds)> = None;
    for (q, (query, df)) in queries.iter().zip(frames).enumerate() {
        for (part, part_events) in
            read_links(df, &query.file, &rules, q as u16, direct.is_none()).await?
        {
            match &mut read {
                None => read = Some((part, part_events)),
                Some((resolver, events)) => {
                    let nodes = resolver.absorb(part);
                    events.absorb(part_events, &nodes);
                }
            }
        }
    }
    let (mut resolver, mut events) =
        read.unwrap_or_else(|| (Resolver::new(rules.clone()), EventIds::default()));
    let mut labels = queries.clone();
    let matching = match_records(engine, &rules, &mut resolver, &mut labels, full).await?;
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        "identity: links read"
    );
    // Past `run.cluster_identity_above` links, components come from SQL rounds.
    let resolution = rounds::resolve(engine, resolver).await?;
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        "identity: resolved"
    );

    if event_sources == 0 && direct.is_none() {
        // No identity query ties identifiers to events: use the events' own identifier columns.
        let own = own_identifier_frame(engine, &rules).await?;
        if let Some(df) = own {
            let mut nodes = Vec::new();
            read_rows(df, "events", &rules, |row, _, message_id, _| {
                nodes.clear();
                // read_rows hands rows over in priority order.
                for &(t, raw) in row {
                    if let Ok(v) = rules.clean(t, raw) {
                        if let Some(n) = resolution.lookup(t, &v) {
                            nodes.push(n);
                        }
                    }
                }
                if let Some(m) = message_id {
                    events.push(m, &nodes);
                }
            })
            .await?;
        }
    }
    events.flush();

    let previous = previous_graph(engine, &resolution, None).await?;
    let ids = assign_profile_ids(&resolution, &previous);
    let changed_profiles = changed_profiles(&resolution, &ids, &previous);
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        "identity: profile ids assigned"
    );
    let mut tables = build_tables(&resolution, &ids, &labels, events, run_id, now)?;
    tables.matching = match matching {
        Some(mut m) => {
            m.scores = scores_with_profiles(m.scores, &resolution, &ids)?;
            Some(m)
        }
        None => None,
    };
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        "identity: tables built"
    );
    if let Some(exprs) = direct {
        if groups::eligible(engine, &queries, &rules).await? {
            let fingerprint = groups::fingerprint(engine, &queries);
            tables.groups = Some(groups::of_resolution(&resolution, &ids, fingerprint)?);
        }
        tables.event_profiles = EventProfiles::Direct(exprs);
    }
    tables.changed_profiles = changed_profiles;
    Ok(tables)
}

/// `match_scores` with the profile of each side's identifier (null when it has none), so
/// that a pair is found by either person's profile id, as `tessera forget` finds rows.
fn scores_with_profiles(
    scores: RecordBatch,
    res: &Resolution,
    ids: &ProfileIds,
) -> Result<RecordBatch> {
    let profile = |spec: Option<&str>| -> Option<&str> {
        let (t, v) = spec?.split_once(':')?;
        let node = res.lookup(res.rules().type_index(t)?, v)?;
        Some(ids.ids[ids.of(res.component(node)?)].as_str())
    };
    let side = |name: &str| -> Result<ArrayRef> {
        let text = scores
            .column_by_name(name)
            .and_then(|c| c.as_string_opt::<i32>())
            .ok_or_else(|| Error::Internal(format!("match_scores has no text column {name}")))?;
        let out: StringArray = text.iter().map(profile).collect();
        Ok(Arc::new(out))
    };
    let (left, right) = (side("left_identifier")?, side("right_identifier")?);
    let schema = scores.schema();
    let at = schema.index_of("right_identifier")? + 1;
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut columns = scores.columns().to_vec();
    fields.insert(at, Field::new("right_profile_id", DataType::Utf8, true));
    fields.insert(at, Field::new("left_profile_id", DataType::Utf8, true));
    columns.insert(at, right);
    columns.insert(at, left);
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}

/// Runs every `[[identity.probabilistic]]` block and adds its records and links to the
/// resolver, each block as one more "query" in `labels`. Returns the matching tables, or
/// `None` without blocks. Unless `full`, blocks reuse the model the last run kept.
async fn match_records(
    engine: &Engine,
    rules: &Rules,
    resolver: &mut Resolver,
    labels: &mut Vec<QueryFile>,
    full: bool,
) -> Result<Option<Matching>> {
    let blocks = &engine.project.config.identity.probabilistic;
    if blocks.is_empty() {
        return Ok(None);
    }
    let kept = if full {
        Default::default()
    } else {
        match_state::load(engine).await?
    };
    let (mut models, mut scores, mut keeps) = (Vec::new(), Vec::new(), Vec::new());
    let mut nodes = Vec::new();
    for (b, block) in blocks.iter().enumerate() {
        let result =
            probabilistic::match_block(engine, b, block, rules, kept.get(&block.name)).await?;
        let query = labels.len() as u16;
        labels.push(QueryFile {
            file: probabilistic::query_label(block),
            sql: String::new(),
            path: engine.project.queries_dir("identity"),
        });
        for row in &result.rows {
            let row: Vec<(u8, &str)> = row.iter().map(|(t, v)| (*t, v.as_str())).collect();
            resolver.add_row(&row, NO_TIME, query, &mut nodes);
        }
        models.push((block.name.clone(), result.model));
        scores.push(result.scores);
        keeps.push(result.keep);
    }
    let (state_model, state_records) = match_state::batches(&keeps)?;
    Ok(Some(Matching {
        model: probabilistic::model_batch(&models)?,
        scores: probabilistic::union_scores(&scores)?,
        state_model,
        state_records,
    }))
}

/// The expressions that give each event its identifiers, when they can be evaluated on the
/// event itself: the one identity query with message_id is a plain `SELECT … FROM events`
/// (no WHERE, join, alias or aggregate), or no query has message_id and the events' own
/// identifier columns are used. `None` otherwise (events then go through a message_id mapping).
async fn direct_identifiers(
    engine: &Engine,
    queries: &[QueryFile],
    event_sources: usize,
    rules: &Rules,
) -> Result<Option<Vec<(u8, Expr)>>> {
    use datafusion::logical_expr::LogicalPlan;
    let mut exprs: Vec<(u8, Expr)> = Vec::new();
    if event_sources == 0 {
        let events = engine.ctx.table(tables::EVENTS).await?;
        for (t, rule) in rules.types.iter().enumerate() {
            if events.schema().has_column_with_unqualified_name(&rule.name) {
                exprs.push((t as u8, Expr::Column(Column::new_unqualified(&rule.name))));
            }
        }
        return Ok(Some(exprs));
    }
    if event_sources > 1 {
        return Ok(None);
    }
    for query in queries {
        let df = engine.query(&query.sql, &query.file).await?;
        if !df.schema().has_column_with_unqualified_name(MESSAGE_ID) {
            continue;
        }
        let LogicalPlan::Projection(projection) = df.logical_plan() else {
            return Ok(None);
        };
        let LogicalPlan::TableScan(scan) = projection.input.as_ref() else {
            return Ok(None);
        };
        if scan.table_name.table() != tables::EVENTS
            || !scan.filters.is_empty()
            || scan.fetch.is_some()
        {
            return Ok(None);
        }
        for (expr, field) in projection.expr.iter().zip(projection.schema.fields()) {
            if let Some(t) = rules.type_index(field.name()) {
                exprs.push((t, expr.clone().unalias()));
            }
        }
    }
    exprs.sort_by_key(|(t, _)| *t);
    Ok(Some(exprs))
}

/// Plans one identity query and checks its columns against `[identity]`.
async fn link_frame(engine: &Engine, query: &QueryFile, rules: &Rules) -> Result<DataFrame> {
    let df = engine.query(&query.sql, &query.file).await?;
    let mut exprs = Vec::new();
    let mut identifiers = 0;
    for field in df.schema().fields() {
        let name = field.name();
        let column = Expr::Column(Column::new_unqualified(name));
        if rules.type_index(name).is_some() || name == MESSAGE_ID {
            identifiers += usize::from(name != MESSAGE_ID);
            exprs.push(text_column(column, field.data_type()).alias(name));
        } else if name == SEEN_AT {
            exprs.push(cast(column, timestamp_type()).alias(name));
        } else {
            let known: Vec<&str> = rules.types.iter().map(|t| t.name.as_str()).collect();
            return Err(Error::query(
                &query.file,
                format!(
                    "column `{name}` is not an identifier type in [identity] (configured: {}); rename it, drop it, or add [[identity.identifiers]] name = \"{name}\" to tessera.toml",
                    known.join(", ")
                ),
            ));
        }
    }
    if identifiers == 0 {
        return Err(Error::query(
            &query.file,
            "returns no identifier columns; name at least one column after an identifier type in [identity]",
        ));
    }
    df.select(exprs).map_err(|e| Error::query(&query.file, e))
}

/// Calls `each(message_id, type, raw value)` for every identifier the identity queries tie to
/// an event of `events` (or, when no query returns message_id, the events' own identifier
/// columns): the links that give events their profile, as `tessera forget` finds a person's
/// events by them.
pub async fn event_identifiers<F>(engine: &Engine, mut each: F) -> Result<()>
where
    F: FnMut(&str, u8, &str),
{
    let rules = Rules::from_config(&engine.project.config.identity);
    each_event_row(engine, &rules, |message_id, row| {
        for &(t, raw) in row {
            each(message_id, t, raw);
        }
    })
    .await
}

/// Calls `each(message_id, identifiers)` for every row the identity queries return with a
/// `message_id` (or, when none returns one, for every event's own identifier columns), with
/// the identifiers in priority order.
async fn each_event_row<F>(engine: &Engine, rules: &Rules, mut each: F) -> Result<()>
where
    F: FnMut(&str, &[(u8, &str)]),
{
    let mut sources = 0;
    for query in &load_queries(engine)? {
        let df = link_frame(engine, query, rules).await?;
        if !df.schema().has_column_with_unqualified_name(MESSAGE_ID) {
            continue;
        }
        sources += 1;
        read_rows(df, &query.file, rules, |row, _, message_id, _| {
            if let Some(m) = message_id {
                each(m, row);
            }
        })
        .await?;
    }
    if sources == 0 {
        if let Some(df) = own_identifier_frame(engine, rules).await? {
            read_rows(df, tables::EVENTS, rules, |row, _, message_id, _| {
                if let Some(m) = message_id {
                    each(m, row);
                }
            })
            .await?;
        }
    }
    Ok(())
}

/// Events' own identifier-typed columns, for linking events to profiles without identity queries.
async fn own_identifier_frame(engine: &Engine, rules: &Rules) -> Result<Option<DataFrame>> {
    let events = engine.ctx.table(tables::EVENTS).await?;
    let schema = events.schema().clone();
    let text = |name: &str| -> Result<Expr> {
        let field = schema.field_with_unqualified_name(name)?;
        let c = Expr::Column(Column::new_unqualified(name));
        Ok(text_column(c, field.data_type()).alias(name))
    };
    let mut exprs = vec![text(MESSAGE_ID)?];
    for t in &rules.types {
        if schema.has_column_with_unqualified_name(&t.name) {
            exprs.push(text(&t.name)?);
        }
    }
    if exprs.len() == 1 {
        return Ok(None);
    }
    Ok(Some(events.select(exprs)?))
}

/// A string column as [`read_stream`] reads it: string views (how the event history is
/// scanned) and plain strings as they are, anything else cast to text. Casting views to plain
/// strings copied every identifier once more before it was hashed.
fn text_column(column: Expr, data_type: &DataType) -> Expr {
    match data_type {
        DataType::Utf8 | DataType::Utf8View => column,
        _ => cast(column, DataType::Utf8),
    }
}

/// One string column of a batch, plain or views.
#[derive(Clone, Copy)]
enum Texts<'a> {
    Plain(&'a StringArray),
    View(&'a StringViewArray),
}

impl<'a> Texts<'a> {
    fn of(array: &'a ArrayRef) -> Texts<'a> {
        match array.as_string_view_opt() {
            Some(view) => Texts::View(view),
            None => Texts::Plain(array.as_string::<i32>()),
        }
    }

    fn get(self, r: usize) -> Option<&'a str> {
        match self {
            Texts::Plain(a) => a.is_valid(r).then(|| a.value(r)),
            Texts::View(a) => a.is_valid(r).then(|| a.value(r)),
        }
    }
}

/// Streams a link frame, calling `each(row, seen_at, message_id, scratch)` per row.
async fn read_rows<F>(df: DataFrame, file: &str, rules: &Rules, each: F) -> Result<()>
where
    F: FnMut(&[(u8, &str)], i64, Option<&str>, &mut Vec<Node>),
{
    let schema = df.schema().as_arrow().clone();
    let stream = df
        .execute_stream()
        .await
        .map_err(|e| Error::query(file, e))?;
    read_stream(stream, &schema, file, rules, each).await
}

/// [`read_rows`] over one stream of the query's rows.
async fn read_stream<F>(
    stream: datafusion::physical_plan::SendableRecordBatchStream,
    schema: &Schema,
    file: &str,
    rules: &Rules,
    mut each: F,
) -> Result<()>
where
    F: FnMut(&[(u8, &str)], i64, Option<&str>, &mut Vec<Node>),
{
    let mut scratch = Vec::new();
    read_blocks(stream, schema, file, rules, |block, messages| {
        for r in 0..block.len() {
            let message = messages.and_then(|m| m.get(r));
            each(block.row(r), block.seen_at[r], message, &mut scratch);
        }
    })
    .await
}

/// Streams a link frame a batch at a time: `each(rows, message_ids)`, the batch's rows of
/// identifiers in priority order (so every row reaches the resolver already sorted) and their
/// message_id column when the frame has one.
async fn read_blocks<F>(
    mut stream: datafusion::physical_plan::SendableRecordBatchStream,
    schema: &Schema,
    file: &str,
    rules: &Rules,
    mut each: F,
) -> Result<()>
where
    F: for<'b> FnMut(&Block<'b>, Option<Texts<'b>>),
{
    let mut id_columns: Vec<(usize, u8)> = schema
        .fields()
        .iter()
        .enumerate()
        .filter_map(|(i, f)| rules.type_index(f.name()).map(|t| (i, t)))
        .collect();
    id_columns.sort_by_key(|(_, t)| *t);
    let seen_col = schema.index_of(SEEN_AT).ok();
    let message_col = schema.index_of(MESSAGE_ID).ok();
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| Error::query(file, e))?;
        let ids: Vec<(Texts, u8)> = id_columns
            .iter()
            .map(|(i, t)| (Texts::of(batch.column(*i)), *t))
            .collect();
        let seen = seen_col.map(|i| {
            batch
                .column(i)
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .expect("seen_at was cast to µs")
                .clone()
        });
        let messages = message_col.map(|i| Texts::of(batch.column(i)));
        let rows = batch.num_rows();
        let mut block = Block {
            ids: Vec::with_capacity(rows * ids.len()),
            ends: Vec::with_capacity(rows),
            seen_at: Vec::with_capacity(rows),
        };
        for r in 0..rows {
            for (array, t) in &ids {
                if let Some(v) = array.get(r) {
                    block.ids.push((*t, v));
                }
            }
            let seen_at = match &seen {
                Some(a) if a.is_valid(r) => a.value(r),
                _ => NO_TIME,
            };
            block.end_row(seen_at);
        }
        each(&block, messages);
    }
    Ok(())
}

/// The previous run's profile of each identifier still in the graph.
struct Previous {
    /// Profile ids, indexed by `of_node` values.
    ids: Vec<String>,
    /// First seen of each previous profile (over all its identifiers then).
    first_seen: Vec<i64>,
    /// For each node, the index of its previous profile (`u32::MAX`: none).
    of_node: Vec<u32>,
    /// For each previous profile, its oldest identifier still in the graph.
    anchor: Vec<Option<(i64, Node)>>,
    /// For each previous profile, whether one of its identifiers is no longer in the graph.
    lost_member: Vec<bool>,
    /// Whether there was a published graph at all.
    published: bool,
    /// The numbers of published profile ids left out by `only` (see [`previous_graph`]):
    /// still taken for new ids.
    other_taken: Vec<u64>,
}

/// Which identifiers of the published graph count, by type and value.
type Only<'a> = &'a dyn Fn(u8, &str) -> bool;

/// The published graph's profiles; with `only`, just the identifiers it accepts (the groups
/// being resolved again), the other profiles' ids kept only as taken.
async fn previous_graph(
    engine: &Engine,
    res: &Resolution,
    only: Option<Only<'_>>,
) -> Result<Previous> {
    let mut prev = Previous {
        ids: Vec::new(),
        first_seen: Vec::new(),
        of_node: vec![u32::MAX; res.len()],
        anchor: Vec::new(),
        lost_member: Vec::new(),
        published: false,
        other_taken: Vec::new(),
    };
    let Some(graph) = engine
        .outputs
        .read(&engine.ctx, tables::IDENTITY_GRAPH)
        .await?
    else {
        return Ok(prev);
    };
    prev.published = true;
    let df = graph.select(vec![
        cast(col("identifier_type"), DataType::Utf8).alias("t"),
        cast(col("identifier_value"), DataType::Utf8).alias("v"),
        cast(col("profile_id"), DataType::Utf8).alias("p"),
        cast(col("first_seen"), timestamp_type()).alias("f"),
    ])?;
    let mut index: HashMap<String, u32> = HashMap::new();
    let mut stream = df.execute_stream().await?;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let (t, v, p) = (
            batch.column(0).as_string::<i32>(),
            batch.column(1).as_string::<i32>(),
            batch.column(2).as_string::<i32>(),
        );
        let f = batch
            .column(3)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .expect("cast to µs");
        for r in 0..batch.num_rows() {
            if p.is_null(r) || t.is_null(r) || v.is_null(r) {
                continue;
            }
            if let Some(only) = only {
                let wanted = res
                    .rules()
                    .type_index(t.value(r))
                    .is_some_and(|ty| only(ty, v.value(r)));
                if !wanted {
                    prev.other_taken.extend(profile_id_number(p.value(r)));
                    continue;
                }
            }
            let seen = if f.is_valid(r) { f.value(r) } else { NO_TIME };
            // Looked up before inserting: most rows name a profile seen already, and `entry`
            // would allocate its key for every row.
            let k = match index.get(p.value(r)) {
                Some(&k) => k,
                None => {
                    prev.ids.push(p.value(r).to_string());
                    prev.first_seen.push(NO_TIME);
                    prev.anchor.push(None);
                    prev.lost_member.push(false);
                    let k = (prev.ids.len() - 1) as u32;
                    index.insert(p.value(r).to_string(), k);
                    k
                }
            };
            prev.first_seen[k as usize] = prev.first_seen[k as usize].min(seen);
            let node = res
                .rules()
                .type_index(t.value(r))
                .and_then(|ty| res.lookup(ty, v.value(r)));
            let Some(n) = node else {
                prev.lost_member[k as usize] = true;
                continue;
            };
            if res.component(n).is_none() {
                prev.lost_member[k as usize] = true;
            }
            prev.of_node[n as usize] = k;
            let a = &mut prev.anchor[k as usize];
            if a.is_none_or(|(s, m)| (seen, n) < (s, m)) {
                *a = Some((seen, n));
            }
        }
    }
    Ok(prev)
}

/// Profile ids for each component, and the merges since the previous run.
struct ProfileIds {
    /// For each node that is a component root, the index of its profile id in `ids`
    /// (`u32::MAX` for every other node): an array, not a map, since it is read once per
    /// identifier and per link.
    of_root: Vec<u32>,
    /// The ids.
    ids: Vec<String>,
    /// (merged, into) pairs.
    merges: Vec<(String, String)>,
}

impl ProfileIds {
    /// The index in `ids` of the profile of component `root`.
    fn of(&self, root: Node) -> usize {
        self.of_root[root as usize] as usize
    }
}

/// The profiles whose identifiers differ from the published graph's (see
/// [`IdentityTables::changed_profiles`]).
fn changed_profiles(res: &Resolution, ids: &ProfileIds, prev: &Previous) -> Option<Vec<String>> {
    if !prev.published {
        return None;
    }
    let mut old_changed = prev.lost_member.clone();
    let mut new_changed = vec![false; ids.ids.len()];
    for n in 0..res.len() as Node {
        let Some(c) = res.component(n) else { continue };
        let now = ids.of(c);
        match prev.of_node[n as usize] {
            u32::MAX => new_changed[now] = true,
            k if prev.ids[k as usize] != ids.ids[now] => {
                new_changed[now] = true;
                old_changed[k as usize] = true;
            }
            _ => {}
        }
    }
    let mut changed: Vec<String> = prev
        .ids
        .iter()
        .zip(old_changed)
        .chain(ids.ids.iter().zip(new_changed))
        .filter(|(_, changed)| *changed)
        .map(|(id, _)| id.clone())
        .collect();
    changed.sort_unstable();
    changed.dedup();
    Some(changed)
}

/// A deterministic id for a new profile, from its oldest identifier.
/// The number a new profile's id shows: FNV-1a of its oldest identifier's type and value
/// (stable across platforms and releases, unlike std's hashers), with `salt` appended as
/// `#<salt>` when the plain value's number was taken.
fn new_profile_number(kind: &str, value: &[u8], salt: Option<u32>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let salt = salt.map(|s| format!("#{s}")).unwrap_or_default();
    for b in kind
        .bytes()
        .chain([0u8])
        .chain(value.iter().copied())
        .chain(salt.bytes())
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

pub(crate) use crate::tables::{profile_id_number, profile_id_text};

fn assign_profile_ids(res: &Resolution, prev: &Previous) -> ProfileIds {
    // Members of each component, grouped in one array (counting sort by component), each
    // group oldest first; components in the order of their oldest members.
    let mut group = vec![u32::MAX; res.len()];
    let mut roots: Vec<Node> = Vec::new();
    let mut start: Vec<usize> = vec![0];
    for n in 0..res.len() as Node {
        if let Some(c) = res.component(n) {
            if group[c as usize] == u32::MAX {
                group[c as usize] = roots.len() as u32;
                roots.push(c);
                start.push(0);
            }
            start[group[c as usize] as usize + 1] += 1;
        }
    }
    for i in 1..start.len() {
        start[i] += start[i - 1];
    }
    let mut members: Vec<Node> = vec![0; start[roots.len()]];
    let mut fill = start.clone();
    for n in 0..res.len() as Node {
        if let Some(c) = res.component(n) {
            let g = group[c as usize] as usize;
            members[fill[g]] = n;
            fill[g] += 1;
        }
    }
    drop(fill);
    for g in 0..roots.len() {
        members[start[g]..start[g + 1]].sort_by(|a, b| res.age_order(*a, *b));
    }
    // Components by their oldest member (`age_order`), comparing cached keys and reading the
    // values only on a tie.
    let mut order: Vec<(i64, u8, u64, u32)> = (0..roots.len())
        .map(|g| {
            let oldest = members[start[g]];
            (
                res.seen(oldest).0,
                res.kind(oldest),
                res.value_prefix(oldest),
                g as u32,
            )
        })
        .collect();
    order.sort_unstable_by(|a, b| {
        (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)).then_with(|| {
            res.value_bytes(members[start[a.3 as usize]])
                .cmp(res.value_bytes(members[start[b.3 as usize]]))
        })
    });
    let comps: Vec<(Node, &[Node])> = order
        .iter()
        .map(|&(_, _, _, g)| {
            let g = g as usize;
            (roots[g], &members[start[g]..start[g + 1]])
        })
        .collect();
    drop(order);

    let mut out = ProfileIds {
        of_root: vec![u32::MAX; res.len()],
        ids: Vec::with_capacity(comps.len()),
        merges: Vec::new(),
    };
    let mut claimed = vec![false; prev.ids.len()];
    // A new id must differ from every id given so far and every previous one. New ids are
    // `p_` and sixteen hex digits, so only previous ids of that form can clash: their
    // numbers, and those of the new ids, are kept in one set.
    let mut taken: foldhash::HashSet<u64> = prev
        .ids
        .iter()
        .filter_map(|id| profile_id_number(id))
        .chain(prev.other_taken.iter().copied())
        .collect();
    let mut candidates: Vec<u32> = Vec::new();
    // Previous profiles keep their ids; where several meet, the oldest keeps its id.
    for (root, m) in &comps {
        candidates.clear();
        if prev.published {
            candidates.extend(
                m.iter()
                    .map(|n| prev.of_node[*n as usize])
                    .filter(|k| *k != u32::MAX),
            );
            candidates.sort_by(|a, b| {
                (prev.first_seen[*a as usize], &prev.ids[*a as usize])
                    .cmp(&(prev.first_seen[*b as usize], &prev.ids[*b as usize]))
            });
            candidates.dedup();
        }
        let id = match candidates.iter().find(|k| !claimed[**k as usize]) {
            Some(&k) => {
                claimed[k as usize] = true;
                prev.ids[k as usize].clone()
            }
            None => {
                let oldest = m[0];
                let kind = &res.rules().types[res.kind(oldest) as usize].name;
                let value = res.value_bytes(oldest);
                let mut number = new_profile_number(kind, value, None);
                let mut salt = 1;
                while !taken.insert(number) {
                    salt += 1;
                    number = new_profile_number(kind, value, Some(salt));
                }
                profile_id_text(number)
            }
        };
        out.of_root[*root as usize] = out.ids.len() as u32;
        out.ids.push(id);
    }
    // A previous profile that no component kept was merged into the one holding its oldest identifier.
    for (k, was) in prev.ids.iter().enumerate() {
        if claimed[k] {
            continue;
        }
        if let Some((_, n)) = prev.anchor[k] {
            if let Some(c) = res.component(n) {
                let into = &out.ids[out.of(c)];
                out.merges.push((was.clone(), into.clone()));
            }
        }
    }
    out.merges.sort();
    out
}

fn time_array(values: impl Iterator<Item = i64>) -> ArrayRef {
    let v: Vec<Option<i64>> = values.map(|t| (t != NO_TIME).then_some(t)).collect();
    Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
}

/// A string column with one value per row, built without a String per value.
fn string_column<'a, T>(rows: &'a [T], each: impl Fn(&'a T) -> &'a str) -> ArrayRef {
    let bytes: usize = rows.iter().map(|r| each(r).len()).sum();
    let mut b = StringBuilder::with_capacity(rows.len(), bytes);
    for r in rows {
        b.append_value(each(r));
    }
    Arc::new(b.finish())
}

fn text(values: Vec<String>) -> ArrayRef {
    Arc::new(StringArray::from(values))
}

/// The schema of `identity_graph`.
pub fn graph_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("identifier_type", DataType::Utf8, false),
        Field::new("identifier_value", DataType::Utf8, false),
        Field::new("profile_id", DataType::Utf8, false),
        Field::new("first_seen", timestamp_type(), true),
        Field::new("last_seen", timestamp_type(), true),
    ]))
}

fn build_tables(
    res: &Resolution,
    ids: &ProfileIds,
    queries: &[QueryFile],
    events: EventIds,
    run_id: &str,
    now: DateTime<Utc>,
) -> Result<IdentityTables> {
    let mut parts = TableParts {
        res,
        ids,
        values: res.value_array(),
    };
    // The graph on this thread, the other three tables on a second one: each is a pass over
    // its own rows, and at 10M events the graph and the links take about 0.1 s apiece.
    let (graph, others) = std::thread::scope(|scope| {
        let others = scope.spawn(|| parts.links_conflicts_merges(queries, run_id, now));
        (parts.graph(), others.join())
    });
    let (graph, identifiers) = graph?;
    let (links, conflicts, merges) =
        others.map_err(|_| Error::Usage("building the identity tables stopped".into()))??;
    // The mapping below reads no value: let the values go first.
    parts.values = None;

    // message_id → profile of the event's highest-priority identifier that has one.
    let schema = event_profile_schema();
    let mut event_profiles = Vec::with_capacity(events.message_ids.len());
    let mut row = 0usize;
    let mut with_profile = 0u64;
    for chunk in &events.message_ids {
        let mut profile = StringBuilder::with_capacity(chunk.len(), chunk.len() * 18);
        let mut rank = Vec::with_capacity(chunk.len());
        for _ in 0..chunk.len() {
            let start = if row == 0 {
                0
            } else {
                events.ends[row - 1] as usize
            };
            let end = events.ends[row] as usize;
            let best = events.nodes[start..end]
                .iter()
                .find_map(|n| parts.profile_of(*n).map(|p| (p, res.kind(*n))));
            match best {
                Some((p, k)) => {
                    profile.append_value(p);
                    rank.push(Some(k));
                    with_profile += 1;
                }
                None => {
                    profile.append_null();
                    rank.push(None);
                }
            }
            row += 1;
        }
        event_profiles.push(RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(chunk.clone()),
                Arc::new(profile.finish()),
                Arc::new(UInt8Array::from(rank)),
            ],
        )?);
    }

    let stats = IdentityStats {
        identifiers: identifiers as u64,
        profiles: ids.ids.len() as u64,
        links_accepted: res.accepted.len() as u64,
        links_refused: res.refused.len() as u64,
        profiles_merged: ids.merges.len() as u64,
        events_with_profile: with_profile,
    };
    Ok(IdentityTables {
        graph,
        links,
        conflicts,
        merges,
        event_profiles: EventProfiles::Mapping(event_profiles),
        stats,
        changed_profiles: None,
        matching: None,
        groups: None,
    })
}

/// What the identity tables are built from.
struct TableParts<'a> {
    res: &'a Resolution,
    ids: &'a ProfileIds,
    /// Every identifier's value as one array, so value columns are gathered with `take`;
    /// `None` above 2 GiB of values (a string per value instead).
    values: Option<StringArray>,
}

impl TableParts<'_> {
    fn type_name(&self, n: Node) -> &str {
        self.res.rules().types[self.res.kind(n) as usize]
            .name
            .as_str()
    }

    fn profile_of(&self, n: Node) -> Option<&String> {
        self.res.component(n).map(|c| &self.ids.ids[self.ids.of(c)])
    }

    /// The values of `nodes`, in order.
    fn value_column(&self, nodes: &mut dyn Iterator<Item = Node>) -> Result<ArrayRef> {
        Ok(match &self.values {
            Some(values) => {
                let indices = arrow::array::UInt32Array::from_iter_values(nodes);
                arrow::compute::take(values, &indices, None)?
            }
            None => {
                let mut b = StringBuilder::new();
                for n in nodes {
                    b.append_value(self.res.value(n));
                }
                Arc::new(b.finish())
            }
        })
    }

    /// `identity_graph` and how many identifiers it has.
    fn graph(&self) -> Result<(RecordBatch, usize)> {
        let (res, ids, rules) = (self.res, self.ids, self.res.rules());
        // identity_graph, ordered by profile then type priority then value. The profiles are
        // ranked by id once (comparing the ids' first sixteen bytes as two integers, the rest
        // only on a tie), the identifiers are grouped by that rank with a counting sort, and
        // only each profile's few identifiers are sorted by type and value.
        let mut order: Vec<(u64, u64, u32)> = ids
            .ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let b = id.as_bytes();
                let rest = b.get(8..).unwrap_or(&[]);
                (graph::prefix_key(b), graph::prefix_key(rest), i as u32)
            })
            .collect();
        order.sort_unstable_by(|a, b| {
            (a.0, a.1)
                .cmp(&(b.0, b.1))
                .then_with(|| ids.ids[a.2 as usize].cmp(&ids.ids[b.2 as usize]))
        });
        let mut rank = vec![0u32; ids.ids.len()];
        for (place, &(_, _, profile)) in order.iter().enumerate() {
            rank[profile as usize] = place as u32;
        }
        drop(order);
        let mut start = vec![0usize; ids.ids.len() + 1];
        for n in 0..res.len() as Node {
            if let Some(c) = res.component(n) {
                start[rank[ids.of(c)] as usize + 1] += 1;
            }
        }
        for i in 1..start.len() {
            start[i] += start[i - 1];
        }
        let mut keyed: Vec<(u8, u64, Node, u32)> = vec![(0, 0, 0, 0); start[ids.ids.len()]];
        let mut fill = start.clone();
        for n in 0..res.len() as Node {
            if let Some(c) = res.component(n) {
                let profile = ids.of(c);
                let r = rank[profile] as usize;
                keyed[fill[r]] = (res.kind(n), res.value_prefix(n), n, profile as u32);
                fill[r] += 1;
            }
        }
        drop(fill);
        for r in 0..ids.ids.len() {
            keyed[start[r]..start[r + 1]].sort_unstable_by(|a, b| {
                (a.0, a.1)
                    .cmp(&(b.0, b.1))
                    .then_with(|| res.value_bytes(a.2).cmp(res.value_bytes(b.2)))
            });
        }
        drop(start);
        drop(rank);
        let graph = RecordBatch::try_new(
            graph_schema(),
            vec![
                string_column(&keyed, |k| rules.types[k.0 as usize].name.as_str()),
                self.value_column(&mut keyed.iter().map(|k| k.2))?,
                string_column(&keyed, |k| ids.ids[k.3 as usize].as_str()),
                time_array(keyed.iter().map(|k| res.seen(k.2).0)),
                time_array(keyed.iter().map(|k| res.seen(k.2).1)),
            ],
        )?;
        Ok((graph, keyed.len()))
    }

    /// `identity_links`, `identity_conflicts` and `profile_merges`.
    fn links_conflicts_merges(
        &self,
        queries: &[QueryFile],
        run_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(RecordBatch, RecordBatch, RecordBatch)> {
        let (res, ids, rules) = (self.res, self.ids, self.res.rules());
        // identity_links: accepted links, in the order applied.
        let l = &res.accepted;
        let links = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("identifier_type", DataType::Utf8, false),
                Field::new("identifier_value", DataType::Utf8, false),
                Field::new("linked_type", DataType::Utf8, false),
                Field::new("linked_value", DataType::Utf8, false),
                Field::new("profile_id", DataType::Utf8, false),
                Field::new("seen_at", timestamp_type(), true),
                Field::new("query", DataType::Utf8, false),
            ])),
            vec![
                string_column(l, |x| self.type_name(x.low)),
                self.value_column(&mut l.iter().map(|x| x.low))?,
                string_column(l, |x| self.type_name(x.top)),
                self.value_column(&mut l.iter().map(|x| x.top))?,
                string_column(l, |x| self.profile_of(x.top).map_or("", String::as_str)),
                time_array(l.iter().map(|x| x.seen_at)),
                string_column(l, |x| queries[x.query as usize].file.as_str()),
            ],
        )?;

        // identity_conflicts
        let f = &res.refused;
        type Named<'a> = (&'a str, String);
        let sides: Vec<(Named, Named)> = f
            .iter()
            .map(|x| (res.side(&x.refused), res.side(&x.other)))
            .collect();
        let conflicts = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("identifier_type", DataType::Utf8, false),
                Field::new("identifier_value", DataType::Utf8, false),
                Field::new("other_type", DataType::Utf8, false),
                Field::new("other_value", DataType::Utf8, false),
                Field::new("reason", DataType::Utf8, false),
                Field::new("seen_at", timestamp_type(), true),
                Field::new("query", DataType::Utf8, false),
            ])),
            vec![
                text(sides.iter().map(|s| s.0 .0.to_string()).collect()),
                text(sides.iter().map(|s| s.0 .1.clone()).collect()),
                text(sides.iter().map(|s| s.1 .0.to_string()).collect()),
                text(sides.iter().map(|s| s.1 .1.clone()).collect()),
                text(f.iter().map(|x| x.reason.describe(rules)).collect()),
                time_array(f.iter().map(|x| x.seen_at)),
                text(
                    f.iter()
                        .map(|x| queries[x.query as usize].file.clone())
                        .collect(),
                ),
            ],
        )?;

        let m = &ids.merges;
        let merges = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("merged_profile_id", DataType::Utf8, false),
                Field::new("into_profile_id", DataType::Utf8, false),
                Field::new("run_id", DataType::Utf8, false),
                Field::new("merged_at", timestamp_type(), false),
            ])),
            vec![
                text(m.iter().map(|x| x.0.clone()).collect()),
                text(m.iter().map(|x| x.1.clone()).collect()),
                text(vec![run_id.to_string(); m.len()]),
                time_array(std::iter::repeat_n(now.timestamp_micros(), m.len())),
            ],
        )?;
        Ok((links, conflicts, merges))
    }
}

/// Internal column names of the event → profile mapping.
const EP_MESSAGE: &str = "__tessera_ep_message_id";
const EP_PROFILE: &str = "profile_id";
const EP_RANK: &str = "__tessera_ep_rank";

fn event_profile_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(EP_MESSAGE, DataType::Utf8, false),
        Field::new(EP_PROFILE, DataType::Utf8, true),
        Field::new(EP_RANK, DataType::UInt8, true),
    ]))
}

/// message_id → profile, for looking events' profiles up while they stream past.
///
/// The mapping's own arrays hold the strings; the table holds only (batch, row) positions,
/// found by hashing the message_id and comparing the strings themselves, so the lookup is exact.
/// Compared with a hash join of the events against the mapping (both as long as the event
/// history), nothing is repartitioned or rebuilt, and memory is 8 bytes a row plus the mapping.
struct ProfileLookup {
    ids: Vec<StringArray>,
    profiles: Vec<StringArray>,
    table: hashbrown::HashTable<u64>,
    hasher: foldhash::fast::FixedState,
}

impl ProfileLookup {
    /// Builds the lookup; with several identity queries one message_id can have several rows,
    /// and the one whose identifier has the highest priority (lowest rank) wins.
    fn new(mapping: &[RecordBatch]) -> Result<ProfileLookup> {
        use std::hash::BuildHasher;
        let hasher = foldhash::fast::FixedState::with_seed(0x070f_11e5);
        let mut ids = Vec::with_capacity(mapping.len());
        let mut profiles = Vec::with_capacity(mapping.len());
        let mut ranks = Vec::with_capacity(mapping.len());
        for batch in mapping {
            let column = |name: &str| {
                batch
                    .column_by_name(name)
                    .cloned()
                    .ok_or_else(|| Error::Usage(format!("event mapping lacks {name}")))
            };
            ids.push(column(EP_MESSAGE)?.as_string::<i32>().clone());
            profiles.push(column(EP_PROFILE)?.as_string::<i32>().clone());
            ranks.push(
                column(EP_RANK)?
                    .as_primitive::<arrow::datatypes::UInt8Type>()
                    .clone(),
            );
        }
        let rows: usize = ids.iter().map(|a| a.len()).sum();
        let mut table = hashbrown::HashTable::with_capacity(rows);
        // A position is batch << 32 | row.
        let rank_of = |pos: u64| {
            let (b, r) = ((pos >> 32) as usize, (pos & 0xffff_ffff) as usize);
            let ranks: &UInt8Array = &ranks[b];
            (
                profiles[b].is_null(r),
                ranks.is_valid(r).then(|| ranks.value(r)),
            )
        };
        for (b, array) in ids.iter().enumerate() {
            for r in 0..array.len() {
                let id = array.value(r);
                let hash = hasher.hash_one(id);
                let pos = ((b as u64) << 32) | r as u64;
                let same =
                    |p: &u64| ids[(*p >> 32) as usize].value((*p & 0xffff_ffff) as usize) == id;
                match table.find_mut(hash, same) {
                    Some(existing) => {
                        // Prefer a row with a profile, then the lower rank.
                        if rank_of(pos) < rank_of(*existing) {
                            *existing = pos;
                        }
                    }
                    None => {
                        table.insert_unique(hash, pos, |p| {
                            hasher.hash_one(
                                ids[(*p >> 32) as usize].value((*p & 0xffff_ffff) as usize),
                            )
                        });
                    }
                }
            }
        }
        Ok(ProfileLookup {
            ids,
            profiles,
            table,
            hasher,
        })
    }

    fn profile(&self, id: &str) -> Option<&str> {
        use std::hash::BuildHasher;
        let hash = self.hasher.hash_one(id);
        let pos = self.table.find(hash, |p| {
            self.ids[(*p >> 32) as usize].value((*p & 0xffff_ffff) as usize) == id
        })?;
        let (b, r) = ((*pos >> 32) as usize, (*pos & 0xffff_ffff) as usize);
        let profiles = &self.profiles[b];
        profiles.is_valid(r).then(|| profiles.value(r))
    }
}

/// `events` with `profile_id`, the way `how` says; `graph` is this run's `identity_graph`.
pub fn resolve_events(
    events: DataFrame,
    how: EventProfiles,
    graph: &RecordBatch,
    rules: &Rules,
) -> Result<DataFrame> {
    match how {
        EventProfiles::Mapping(mapping) => resolved_events(events, mapping),
        EventProfiles::Direct(exprs) => {
            let lookup = Arc::new(GraphLookup::new(graph, rules)?);
            let rules = Arc::new(rules.clone());
            let types: Vec<u8> = exprs.iter().map(|(t, _)| *t).collect();
            let profile_of = datafusion::logical_expr::create_udf(
                "__tessera_profile_of_identifiers",
                vec![DataType::Utf8; types.len()],
                DataType::Utf8,
                datafusion::logical_expr::Volatility::Immutable,
                Arc::new(move |args: &[datafusion::logical_expr::ColumnarValue]| {
                    let arrays = datafusion::logical_expr::ColumnarValue::values_to_arrays(args)?;
                    let arrays: Vec<&StringArray> =
                        arrays.iter().map(|a| a.as_string::<i32>()).collect();
                    let found = lookup.profiles_of(&types, &arrays, &rules);
                    let mut out = StringBuilder::with_capacity(found.len(), found.len() * 18);
                    for row in found {
                        out.append_option(lookup.profile_at(row));
                    }
                    Ok(datafusion::logical_expr::ColumnarValue::Array(Arc::new(
                        out.finish(),
                    )))
                }),
            );
            let profile = if exprs.is_empty() {
                datafusion::logical_expr::lit(datafusion::common::ScalarValue::Utf8(None))
            } else {
                profile_of.call(
                    exprs
                        .into_iter()
                        .map(|(_, e)| cast(e, DataType::Utf8))
                        .collect(),
                )
            };
            let columns: Vec<Expr> = events
                .schema()
                .fields()
                .iter()
                .map(|f| Expr::Column(Column::new_unqualified(f.name())))
                .chain([profile.alias(EP_PROFILE)])
                .collect();
            Ok(events.select(columns)?)
        }
    }
}

/// (identifier type, value) → profile, over the rows of an `identity_graph` batch: the batch
/// holds the strings, the table their row numbers.
///
/// The table is laid out like the resolver's interner: open addressing, each slot holding its
/// hash's top bits above the row number, so a slot's place follows from the hash alone. Events
/// are looked up a batch at a time with each identifier's slot, then row, then bytes
/// prefetched ahead of need: on shuffled events nearly every identifier misses the cache, and
/// one at a time each miss waited for the one before.
struct GraphLookup {
    kind: Vec<u8>,
    value: StringArray,
    profile: StringArray,
    slots: Vec<graph::Slot>,
    hasher: foldhash::fast::FixedState,
}

/// A row number that is no row.
const NO_ROW: u32 = u32::MAX;

impl GraphLookup {
    fn new(graph: &RecordBatch, rules: &Rules) -> Result<GraphLookup> {
        let column = |name: &str| -> Result<StringArray> {
            let c = graph
                .column_by_name(name)
                .ok_or_else(|| Error::Usage(format!("identity graph lacks {name}")))?;
            Ok(arrow::compute::cast(c, &DataType::Utf8)?
                .as_string::<i32>()
                .clone())
        };
        let (kind_names, value, profile) = (
            column("identifier_type")?,
            column("identifier_value")?,
            column("profile_id")?,
        );
        if value.len() >= NO_ROW as usize {
            return Err(Error::Usage(format!(
                "the identity graph has {} identifiers, more than the {} the lookup of each event's profile can hold; this is a limit of Tessera's, please report it",
                value.len(),
                NO_ROW - 1
            )));
        }
        let kind: Vec<u8> = (0..kind_names.len())
            .map(|r| rules.type_index(kind_names.value(r)).unwrap_or(u8::MAX))
            .collect();
        // At most half full: probes stay short, mostly within one cache line.
        let slots = vec![graph::EMPTY; (value.len() * 2).next_power_of_two().max(16)];
        let mut lookup = GraphLookup {
            kind,
            value,
            profile,
            slots,
            hasher: foldhash::fast::FixedState::with_seed(0x6a09_e667),
        };
        for r in 0..lookup.value.len() {
            let (t, v) = (lookup.kind[r], lookup.value.value(r).as_bytes());
            let h = lookup.hash(t, v);
            // The graph holds each identifier once; should it not, the first row stays.
            if let Err(free) = lookup.find(t, v, h) {
                lookup.slots[free] = (h & graph::TAG) | (r as u64 + 1);
            }
        }
        Ok(lookup)
    }

    fn hash(&self, t: u8, v: &[u8]) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one((t, v))
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// The row of `(t, v)` (hash `h`), or the empty slot where it would go.
    fn find(&self, t: u8, v: &[u8], h: u64) -> std::result::Result<u32, usize> {
        let mask = self.mask();
        let mut i = h as usize & mask;
        loop {
            let slot = self.slots[i];
            if slot == graph::EMPTY {
                return Err(i);
            }
            if slot & graph::TAG == h & graph::TAG {
                let r = (slot as u32).wrapping_sub(1);
                if self.kind[r as usize] == t && self.value.value(r as usize).as_bytes() == v {
                    return Ok(r);
                }
            }
            i = (i + 1) & mask;
        }
    }

    /// With `h`'s slot loaded: starts loading the type and string offsets of the first row
    /// whose tag matches, and returns it (a guess, for the bytes' prefetch).
    fn prefetch_row(&self, h: u64) -> u32 {
        let mask = self.mask();
        let mut i = h as usize & mask;
        loop {
            let slot = self.slots[i];
            if slot == graph::EMPTY {
                return NO_ROW;
            }
            if slot & graph::TAG == h & graph::TAG {
                let r = (slot as u32).wrapping_sub(1);
                graph::prefetch(&self.kind[r as usize]);
                graph::prefetch(&self.value.value_offsets()[r as usize]);
                graph::prefetch(&self.profile.value_offsets()[r as usize]);
                return r;
            }
            i = (i + 1) & mask;
        }
    }

    /// With row `r`'s offsets loaded: starts loading its value and profile bytes.
    fn prefetch_bytes(&self, r: u32) {
        let r = r as usize;
        let start = |a: &StringArray| a.value_offsets()[r] as usize;
        if let Some(b) = self.value.values().get(start(&self.value)) {
            graph::prefetch(b);
        }
        if let Some(b) = self.profile.values().get(start(&self.profile)) {
            graph::prefetch(b);
        }
    }

    /// Each event's graph row: that of its highest-priority identifier that has a profile
    /// (`NO_ROW` when none has). `arrays` hold the raw identifiers of `types`, in priority
    /// order; each type is looked up for the events still without a row.
    fn profiles_of(&self, types: &[u8], arrays: &[&StringArray], rules: &Rules) -> Vec<u32> {
        const SLOT_AHEAD: usize = 16;
        const ROW_AHEAD: usize = 8;
        const BYTES_AHEAD: usize = 4;
        let rows = arrays.first().map_or(0, |a| a.len());
        let mut found = vec![NO_ROW; rows];
        let mut keys: Vec<(usize, std::borrow::Cow<'_, str>, u64)> = Vec::with_capacity(rows);
        let mut guess: Vec<u32> = Vec::with_capacity(rows);
        for (&t, array) in types.iter().zip(arrays) {
            keys.clear();
            for (event, row) in found.iter().enumerate() {
                if *row != NO_ROW || array.is_null(event) {
                    continue;
                }
                if let Ok(v) = rules.clean(t, array.value(event)) {
                    let h = self.hash(t, v.as_bytes());
                    keys.push((event, v, h));
                }
            }
            guess.clear();
            guess.resize(keys.len(), NO_ROW);
            for i in 0..keys.len() {
                if let Some((_, _, h)) = keys.get(i + SLOT_AHEAD) {
                    graph::prefetch(&self.slots[*h as usize & self.mask()]);
                }
                if let Some((_, _, h)) = keys.get(i + ROW_AHEAD) {
                    guess[i + ROW_AHEAD] = self.prefetch_row(*h);
                }
                if let Some(&r) = guess.get(i + BYTES_AHEAD) {
                    if r != NO_ROW {
                        self.prefetch_bytes(r);
                    }
                }
                let (event, v, h) = &keys[i];
                if let Ok(r) = self.find(t, v.as_bytes(), *h) {
                    if self.profile.is_valid(r as usize) {
                        found[*event] = r;
                    }
                }
            }
        }
        found
    }

    /// The profile at graph row `r`; `None` for `NO_ROW`.
    fn profile_at(&self, r: u32) -> Option<&str> {
        (r != NO_ROW).then(|| self.profile.value(r as usize))
    }
}

/// `events` with `profile_id`: each event's profile looked up by its message_id as it streams.
pub fn resolved_events(events: DataFrame, mapping: Vec<RecordBatch>) -> Result<DataFrame> {
    let lookup = Arc::new(ProfileLookup::new(&mapping)?);
    drop(mapping);
    let profile_of = datafusion::logical_expr::create_udf(
        "__tessera_profile_of",
        vec![DataType::Utf8],
        DataType::Utf8,
        datafusion::logical_expr::Volatility::Immutable,
        Arc::new(move |args: &[datafusion::logical_expr::ColumnarValue]| {
            let arrays = datafusion::logical_expr::ColumnarValue::values_to_arrays(args)?;
            let ids = arrays[0].as_string::<i32>();
            let mut out = StringBuilder::with_capacity(ids.len(), ids.len() * 18);
            for id in ids.iter() {
                out.append_option(id.and_then(|id| lookup.profile(id)));
            }
            Ok(datafusion::logical_expr::ColumnarValue::Array(Arc::new(
                out.finish(),
            )))
        }),
    );
    let columns: Vec<Expr> = events
        .schema()
        .fields()
        .iter()
        .map(|f| Expr::Column(Column::new_unqualified(f.name())))
        .chain([profile_of.call(vec![col(MESSAGE_ID)]).alias(EP_PROFILE)])
        .collect();
    Ok(events.select(columns)?)
}

/// `events` with `profile_id` looked up in the published `identity_graph`, for SQL run outside
/// a run (`tessera query`). Each event's identifiers come from the identity queries exactly as
/// in a run, so an event gets the profile a run would give it. `None` before the first run.
pub async fn events_with_published_profiles(
    engine: &Engine,
    events: DataFrame,
) -> Result<Option<DataFrame>> {
    let Some(graph) = engine
        .outputs
        .read(&engine.ctx, tables::IDENTITY_GRAPH)
        .await?
    else {
        return Ok(None);
    };
    let rules = Rules::from_config(&engine.project.config.identity);
    let graph = graph.select(vec![
        cast(col("identifier_type"), DataType::Utf8).alias("t"),
        cast(col("identifier_value"), DataType::Utf8).alias("v"),
        cast(col("profile_id"), DataType::Utf8).alias("p"),
    ])?;
    let mut profiles: Vec<String> = Vec::new();
    let mut profile_index: HashMap<String, u32> = HashMap::new();
    let mut of_identifier: HashMap<(u8, String), u32> = HashMap::new();
    let mut stream = graph.execute_stream().await?;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let (t, v, p) = (
            batch.column(0).as_string::<i32>(),
            batch.column(1).as_string::<i32>(),
            batch.column(2).as_string::<i32>(),
        );
        for r in 0..batch.num_rows() {
            let Some(ty) = (t.is_valid(r))
                .then(|| rules.type_index(t.value(r)))
                .flatten()
            else {
                continue;
            };
            if v.is_null(r) || p.is_null(r) {
                continue;
            }
            let k = *profile_index
                .entry(p.value(r).to_string())
                .or_insert_with(|| {
                    profiles.push(p.value(r).to_string());
                    (profiles.len() - 1) as u32
                });
            of_identifier.insert((ty, v.value(r).to_string()), k);
        }
    }

    let mut out = MappingBuilder::default();
    let lookup = |row: &[(u8, &str)]| -> Option<(u32, u8)> {
        // read_rows hands rows over in priority order: the first identifier found wins.
        row.iter().find_map(|&(t, raw)| {
            let v = rules.clean(t, raw).ok()?;
            of_identifier.get(&(t, v.into_owned())).map(|k| (*k, t))
        })
    };
    each_event_row(engine, &rules, |m, row| {
        out.push(
            m,
            lookup(row).map(|(k, t)| (profiles[k as usize].as_str(), t)),
        );
    })
    .await?;
    Ok(Some(resolved_events(events, out.finish()?)?))
}

/// Builds message_id → profile_id batches.
#[derive(Default)]
struct MappingBuilder {
    message: Option<StringBuilder>,
    profile: Option<StringBuilder>,
    rank: Vec<Option<u8>>,
    batches: Vec<RecordBatch>,
}

impl MappingBuilder {
    fn push(&mut self, message_id: &str, profile: Option<(&str, u8)>) {
        self.message
            .get_or_insert_with(StringBuilder::new)
            .append_value(message_id);
        self.profile
            .get_or_insert_with(StringBuilder::new)
            .append_option(profile.map(|p| p.0));
        self.rank.push(profile.map(|p| p.1));
        if self.rank.len() >= EventIds::CHUNK {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if let (Some(mut m), Some(mut p)) = (self.message.take(), self.profile.take()) {
            let rank = UInt8Array::from(std::mem::take(&mut self.rank));
            let batch = RecordBatch::try_new(
                event_profile_schema(),
                vec![Arc::new(m.finish()), Arc::new(p.finish()), Arc::new(rank)],
            )
            .expect("the three columns get one value per push");
            self.batches.push(batch);
        }
    }

    fn finish(mut self) -> Result<Vec<RecordBatch>> {
        self.flush();
        Ok(self.batches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn new_profile_ids_read_back_as_their_numbers_and_nothing_else_does() {
        for number in [0, 1, 0x00ab_cdef_0123_4567, u64::MAX] {
            assert_eq!(profile_id_number(&profile_id_text(number)), Some(number));
        }
        for other in [
            "p_00ABCDEF01234567", // upper case is not what profile_id_text writes
            "p_0abc",
            "p_00abcdef012345678",
            "x_00abcdef01234567",
            "p_00abcdef0123456g",
            "",
        ] {
            assert_eq!(profile_id_number(other), None, "{other}");
        }
        // The salted form is the one the earlier releases used: `<value>#<salt>`.
        assert_eq!(
            new_profile_number("email", b"a@b.c", Some(2)),
            new_profile_number("email", b"a@b.c#2", None)
        );
    }

    proptest! {
        #[test]
        fn the_prefix_key_never_contradicts_byte_order(
            a in proptest::collection::vec(any::<u8>(), 0..12),
            b in proptest::collection::vec(any::<u8>(), 0..12),
        ) {
            let (ka, kb) = (graph::prefix_key(&a), graph::prefix_key(&b));
            if ka != kb {
                prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            }
        }
    }

    proptest! {
        /// The batched, prefetching graph lookup gives every event the profile of its
        /// highest-priority identifier that the graph holds, as a plain map would; values
        /// are cleaned first (so ` A@X.io ` finds `a@x.io`), and the table is small enough
        /// for long probe runs.
        #[test]
        fn the_graph_lookup_agrees_with_a_plain_map(
            graph_rows in proptest::collection::vec((0u8..3, 0u16..40, 0u8..12), 0..120),
            events in proptest::collection::vec(
                proptest::collection::vec(proptest::option::of((0u16..50, any::<bool>())), 3),
                0..200,
            ),
        ) {
            use crate::config::Normalize;
            let rules = graph::tests::rules(&[
                ("user_id", Normalize::Trim, Some(1), &[], None),
                ("email", Normalize::Email, None, &[], None),
                ("anonymous_id", Normalize::Trim, None, &[], None),
            ]);
            let names = ["user_id", "email", "anonymous_id"];
            let text = |t: u8, n: u16| match t {
                1 => format!("p{n}@x.io"),
                _ => format!("{}-{n}", names[t as usize]),
            };
            let mut plain: std::collections::HashMap<(u8, String), String> = Default::default();
            let (mut kinds, mut values, mut profiles) = (vec![], vec![], vec![]);
            for (t, n, p) in &graph_rows {
                let key = (*t, text(*t, *n));
                if plain.contains_key(&key) {
                    continue;
                }
                plain.insert(key.clone(), format!("p_{p}"));
                kinds.push(names[*t as usize]);
                values.push(key.1);
                profiles.push(format!("p_{p}"));
            }
            let batch = RecordBatch::try_new(
                graph_schema_for_test(),
                vec![
                    Arc::new(StringArray::from(kinds)),
                    Arc::new(StringArray::from(values)),
                    Arc::new(StringArray::from(profiles)),
                ],
            )
            .unwrap();
            let lookup = GraphLookup::new(&batch, &rules).unwrap();
            // Column t holds each event's raw identifier of type t (emails in upper case and
            // padded when the flag says so).
            let columns: Vec<StringArray> = (0..3u8)
                .map(|t| {
                    StringArray::from(
                        events
                            .iter()
                            .map(|e| {
                                e[t as usize].map(|(n, loud)| {
                                    let v = text(t, n);
                                    if loud && t == 1 { format!("  {}", v.to_uppercase()) } else { v }
                                })
                            })
                            .collect::<Vec<_>>(),
                    )
                })
                .collect();
            let arrays: Vec<&StringArray> = columns.iter().collect();
            let found = lookup.profiles_of(&[0, 1, 2], &arrays, &rules);
            for (i, e) in events.iter().enumerate() {
                let expected = (0..3u8).find_map(|t| {
                    e[t as usize].and_then(|(n, _)| plain.get(&(t, text(t, n))))
                });
                prop_assert_eq!(lookup.profile_at(found[i]), expected.map(String::as_str));
            }
        }
    }

    fn graph_schema_for_test() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("identifier_type", DataType::Utf8, false),
            Field::new("identifier_value", DataType::Utf8, false),
            Field::new("profile_id", DataType::Utf8, false),
        ]))
    }

    #[test]
    fn events_read_in_parts_keep_their_nodes_once_absorbed() {
        let mut first = EventIds::default();
        first.push("m1", &[0, 1]);
        let mut second = EventIds::default();
        second.push("m2", &[0]);
        second.push("m3", &[]);
        second.push("m4", &[1, 0]);
        // The second part's node 0 is the first part's node 1; its node 1 is new (node 2).
        first.absorb(second, &[1, 2]);
        first.push("m5", &[2]);
        first.flush();
        let ids: Vec<&str> = first
            .message_ids
            .iter()
            .flat_map(|a| a.iter().map(|m| m.unwrap()))
            .collect();
        assert_eq!(ids, ["m1", "m2", "m3", "m4", "m5"]);
        let mut start = 0;
        let mut nodes = Vec::new();
        for &end in &first.ends {
            nodes.push(first.nodes[start as usize..end as usize].to_vec());
            start = end;
        }
        assert_eq!(nodes, [vec![0, 1], vec![1], vec![], vec![2, 1], vec![2]]);
    }
}
