//! Identity by connected groups: what identity resolution keeps between runs so that an
//! incremental run resolves only the groups its new events reach.
//!
//! A **group** is a connected component of the candidate links: every link the identity
//! queries produced, before any rule refused it (max_links, limits), plus the refusals of
//! blocklisted, empty and invalid values, which hang off the row's kept identifier. Every
//! decision the rules take about an identifier (its degree for `max_links`, the limit counts of
//! the profiles it could join, the time order of the links around it) reads only links of its
//! own group, so resolving a group on its own gives exactly the profiles, refusals and ids a
//! resolution of everything gives it. A value over `max_links` stays over it (links are only
//! added), so its refused links join nothing: it is a group of its own, and the resolver is
//! told it is shared ([`Resolver::resolve_with_shared`]) when only some of its links are there.
//!
//! Three `_state` tables hold the groups, written and published with the identity tables:
//!
//! - `_state/identity_ids`: every identifier (shared ones too) with its group, first and last
//!   seen, profile, and whether it is shared;
//! - `_state/identity_links`: every distinct candidate link (the two identifiers, first
//!   `seen_at`, the query that produced it first, which is the resolver's tie-break) and every
//!   refused value, with the group of its other side;
//! - `_state/identity_groups`: one row: a fingerprint of the identity rules, the identity
//!   queries and Tessera's version, and the versions of `identity_graph` and of the event
//!   history published with the groups.
//!
//! An incremental run whose identity queries are row-wise over `events` runs them over the
//! new events only, finds the groups their identifiers belong to, and resolves those groups
//! again from their kept identifiers and links plus the new rows, with the same
//! [`Resolver`]; every other group keeps its published rows. Groups only grow between full
//! runs (events are only added), so the touched groups merge into one where new links join
//! them. Anything else (`--full`, changed rules or queries, a `forget` that rewrote the graph
//! or the history, missing state, another release) resolves every group, as before.

use foldhash::HashSet;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray, UInt8Array,
};
use arrow::compute::{cast, concat_batches, filter_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::{DateTime, Utc};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::TableProvider;
use datafusion::logical_expr::{Expr, LogicalPlan, Volatility};
use foldhash::HashMap;

use super::graph::{Node, Resolution, Resolver, Rules, Side, NO_TIME};
use super::{EventIds, EventProfiles, IdentityTables, ProfileIds};
use crate::config::QueryFile;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::output::Outputs;
use crate::tables::{self, timestamp_type};

/// Every identifier with its group.
pub const IDS: &str = tables::state::IDENTITY_IDS;
/// Every distinct candidate link and refused value, with its group.
pub const LINKS: &str = tables::state::IDENTITY_LINKS;
/// The fingerprint, published graph version and next group number.
pub const META: &str = tables::state::IDENTITY_GROUPS;

const KIND_LINK: &str = "link";
const KIND_DROPPED: &str = "dropped";

/// What `tessera plan` says identity runs over when it resolves by groups.
pub const NEW_GROUPS: &str = "the groups new events reach";
/// What `tessera plan` says identity runs over otherwise.
pub const EVERY_EVENT: &str = "every event";

/// The groups a run leaves, to publish with its identity tables.
pub struct Groups {
    /// `_state/identity_ids` rows.
    pub ids: Vec<RecordBatch>,
    /// `_state/identity_links` rows.
    pub links: Vec<RecordBatch>,
    /// See [`fingerprint`].
    pub fingerprint: String,
}

/// What an incremental run hands identity: the event history's data files its new events
/// were written to.
pub struct NewEvents {
    /// URLs of the new files of `_state/events`.
    pub files: Vec<String>,
}

/// The identity rules, the identity queries and Tessera's version, as a digest: groups kept
/// under another one are not reused.
pub fn fingerprint(engine: &Engine, queries: &[QueryFile]) -> String {
    let config =
        serde_json::to_string(&engine.project.config.identity).unwrap_or_else(|e| e.to_string());
    let mut text = format!("{}\u{0}{config}", env!("CARGO_PKG_VERSION"));
    for q in queries {
        text.push('\u{0}');
        text.push_str(&q.file);
        text.push('\u{0}');
        text.push_str(&q.sql);
    }
    crate::digest::sha256_hex(&text)
}

/// The data files this run added to the event history (`staged` is the run's view of the
/// output), or why the history cannot be told apart that way: none published yet, or files
/// of it gone (rewritten), whose events the kept groups may still hold links of.
pub async fn new_event_files(
    engine: &Engine,
    staged: &Outputs,
) -> Result<std::result::Result<NewEvents, Fallback>> {
    let name = crate::output::state::EVENTS;
    let Some(published) = engine.outputs.open(name).await? else {
        return Ok(Err("no event history is published yet".into()));
    };
    let Some(now) = staged.open(name).await? else {
        return Ok(Err("the run wrote no event history".into()));
    };
    let mut before: HashSet<String> = published
        .get_file_uris()
        .map_err(|e| Error::delta(name, e))?
        .collect();
    let mut files = Vec::new();
    for uri in now.get_file_uris().map_err(|e| Error::delta(name, e))? {
        if !before.remove(&uri) {
            files.push(uri);
        }
    }
    if !before.is_empty() {
        return Ok(Err(
            "the run rewrote files of the event history instead of adding files".into(),
        ));
    }
    Ok(Ok(NewEvents { files }))
}

/// Whether an identity query's rows each come from one event and nothing else: it reads only
/// `events`, through projections and filters, with nothing volatile, no aggregate, window,
/// subquery or `LIMIT`. Such a query run over the new events gives exactly the rows it adds
/// to a run over the whole history.
pub fn row_wise(plan: &LogicalPlan) -> bool {
    let mut ok = true;
    let _ = plan.apply(|node| {
        match node {
            LogicalPlan::Projection(_) | LogicalPlan::Filter(_) | LogicalPlan::SubqueryAlias(_) => {
            }
            LogicalPlan::TableScan(scan)
                if scan.table_name.table() == tables::EVENTS && scan.fetch.is_none() => {}
            _ => ok = false,
        }
        for expr in node.expressions() {
            let _ = expr.apply(|e| {
                match e {
                    Expr::ScalarFunction(f)
                        if f.func.signature().volatility != Volatility::Immutable =>
                    {
                        ok = false
                    }
                    Expr::ScalarSubquery(_)
                    | Expr::Exists(_)
                    | Expr::InSubquery(_)
                    | Expr::OuterReferenceColumn(..)
                    | Expr::AggregateFunction(_)
                    | Expr::WindowFunction(_) => ok = false,
                    _ => {}
                }
                Ok(TreeNodeRecursion::Continue)
            });
        }
        Ok(if ok {
            TreeNodeRecursion::Continue
        } else {
            TreeNodeRecursion::Stop
        })
    });
    ok
}

/// Why the groups cannot be used this run (logged at `-v`), when it is not an error.
pub type Fallback = String;

/// The kept state, as published.
struct Kept {
    /// Per identifier type: each shared value's group (shared values are few; nothing is
    /// kept in memory per identifier beyond the rows themselves).
    shared: Vec<HashMap<Box<str>, i64>>,
    ids: Vec<RecordBatch>,
    links: Vec<RecordBatch>,
}

impl Kept {
    fn shared_group(&self, t: u8, v: &str) -> Option<i64> {
        self.shared.get(t as usize)?.get(v).copied()
    }
}

/// Identifiers by type, for membership tests on (type, value) without a String per test.
struct IdSet(Vec<HashSet<Box<str>>>);

impl IdSet {
    fn new(types: usize) -> Self {
        IdSet(vec![HashSet::default(); types])
    }

    fn insert(&mut self, t: u8, v: &str) {
        if let Some(set) = self.0.get_mut(t as usize) {
            if !set.contains(v) {
                set.insert(v.into());
            }
        }
    }

    fn contains(&self, t: u8, v: &str) -> bool {
        self.0.get(t as usize).is_some_and(|s| s.contains(v))
    }
}

fn ids_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("group_id", DataType::Int64, false),
        Field::new("identifier_type", DataType::Utf8, false),
        Field::new("identifier_value", DataType::Utf8, false),
        Field::new("first_seen", timestamp_type(), true),
        Field::new("last_seen", timestamp_type(), true),
        Field::new("profile_id", DataType::Utf8, true),
        Field::new("shared", DataType::Boolean, false),
    ]))
}

fn links_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("group_id", DataType::Int64, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("identifier_type", DataType::Utf8, false),
        Field::new("identifier_value", DataType::Utf8, false),
        Field::new("other_type", DataType::Utf8, false),
        Field::new("other_value", DataType::Utf8, false),
        Field::new("seen_at", timestamp_type(), true),
        Field::new("query", DataType::Int32, false),
        Field::new("profile_id", DataType::Utf8, true),
    ]))
}

fn meta_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("fingerprint", DataType::Utf8, false),
        Field::new("graph_version", DataType::Int64, false),
        Field::new("events_version", DataType::Int64, false),
    ]))
}

/// The `_state/identity_groups` row: the groups name the versions of `identity_graph` and of
/// the event history published with them, so a run knows when anything else (`tessera
/// forget`) rewrote either.
pub fn meta_batch(
    fingerprint: String,
    graph_version: u64,
    events_version: u64,
) -> Result<RecordBatch> {
    Ok(RecordBatch::try_new(
        meta_schema(),
        vec![
            Arc::new(StringArray::from(vec![fingerprint])),
            Arc::new(Int64Array::from(vec![graph_version as i64])),
            Arc::new(Int64Array::from(vec![events_version as i64])),
        ],
    )?)
}

/// The published version of table `name` (0 when it has none).
pub async fn published_version(engine: &Engine, name: &str) -> Result<u64> {
    Ok(engine
        .outputs
        .open(name)
        .await?
        .and_then(|t| t.version())
        .unwrap_or(0))
}

/// A batch with `schema`'s columns, cast from a published batch (read back with view types).
fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    let columns = schema
        .fields()
        .iter()
        .map(|f| {
            let c = batch.column_by_name(f.name()).ok_or_else(|| {
                Error::Internal(format!("kept identity state lacks column {}", f.name()))
            })?;
            Ok(cast(c, f.data_type())?)
        })
        .collect::<Result<Vec<ArrayRef>>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

async fn read_all(
    engine: &Engine,
    name: &str,
    schema: &SchemaRef,
) -> Result<Option<Vec<RecordBatch>>> {
    let Some(df) = engine.outputs.read(&engine.ctx, name).await? else {
        return Ok(None);
    };
    let batches = df.collect().await?;
    Ok(Some(
        batches
            .iter()
            .map(|b| conform(b, schema))
            .collect::<Result<_>>()?,
    ))
}

fn texts<'a>(batch: &'a RecordBatch, name: &str) -> &'a StringArray {
    batch
        .column_by_name(name)
        .expect("conformed to the state schema")
        .as_string::<i32>()
}

fn times(batch: &RecordBatch, name: &str) -> TimestampMicrosecondArray {
    batch
        .column_by_name(name)
        .expect("conformed to the state schema")
        .as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
        .clone()
}

fn time_at(a: &TimestampMicrosecondArray, r: usize) -> i64 {
    if a.is_valid(r) {
        a.value(r)
    } else {
        NO_TIME
    }
}

fn groups_column(batch: &RecordBatch) -> &Int64Array {
    batch
        .column_by_name("group_id")
        .expect("conformed to the state schema")
        .as_primitive::<arrow::datatypes::Int64Type>()
}

/// Whether the kept groups were kept under `fingerprint` with the published graph and event
/// history; otherwise why they cannot be used.
async fn check_meta(
    engine: &Engine,
    fingerprint: &str,
) -> Result<std::result::Result<(), Fallback>> {
    let Some(meta) = read_all(engine, META, &meta_schema()).await? else {
        return Ok(Err("no identity groups were kept by the last run".into()));
    };
    let Some(row) = meta.iter().find(|b| b.num_rows() > 0) else {
        return Ok(Err("the kept identity groups are empty".into()));
    };
    if texts(row, "fingerprint").value(0) != fingerprint {
        return Ok(Err(
            "the identity rules, the identity queries or Tessera's version changed since the groups were kept"
                .into(),
        ));
    }
    let number = |name: &str| {
        row.column_by_name(name)
            .expect("conformed")
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(0)
    };
    for (name, kept) in [
        (tables::IDENTITY_GRAPH, number("graph_version")),
        (crate::output::state::EVENTS, number("events_version")),
    ] {
        if published_version(engine, name).await? as i64 != kept {
            return Ok(Err(format!(
                "{name} changed since the groups were kept (by `tessera forget`, or a run that kept none)"
            )));
        }
    }
    Ok(Ok(()))
}

/// Loads the kept groups when they can be used with this run's rules, queries and published
/// graph; otherwise says why not.
async fn load(
    engine: &Engine,
    rules: &Rules,
    fingerprint: &str,
) -> Result<std::result::Result<Kept, Fallback>> {
    if let Err(why) = check_meta(engine, fingerprint).await? {
        return Ok(Err(why));
    }
    let (Some(ids), Some(links)) = (
        read_all(engine, IDS, &ids_schema()).await?,
        read_all(engine, LINKS, &links_schema()).await?,
    ) else {
        return Ok(Err("the kept identity groups are missing a table".into()));
    };
    let mut shared_of: Vec<HashMap<Box<str>, i64>> = vec![HashMap::default(); rules.types.len()];
    for batch in &ids {
        let (t, v, g) = (
            texts(batch, "identifier_type"),
            texts(batch, "identifier_value"),
            groups_column(batch),
        );
        let shared = batch
            .column_by_name("shared")
            .expect("conformed to the state schema")
            .as_boolean();
        for r in 0..batch.num_rows() {
            let Some(ty) = rules.type_index(t.value(r)) else {
                return Ok(Err(format!(
                    "the kept identity groups name an unknown identifier type `{}`",
                    t.value(r)
                )));
            };
            if shared.value(r) {
                shared_of[ty as usize].insert(v.value(r).into(), g.value(r));
            }
        }
    }
    Ok(Ok(Kept {
        shared: shared_of,
        ids,
        links,
    }))
}

/// Plans each identity query over the new events only (registered as `events` while they are
/// planned), or says why the queries do not qualify.
async fn new_rows(
    engine: &Engine,
    queries: &[QueryFile],
    rules: &Rules,
    new: &NewEvents,
) -> Result<std::result::Result<Vec<datafusion::dataframe::DataFrame>, Fallback>> {
    let ctx = &engine.ctx;
    let mut frames = Vec::new();
    // Each query must be row-wise over the whole history's `events` first.
    for query in queries {
        let df = super::link_frame(engine, query, rules).await?;
        if !row_wise(df.logical_plan()) {
            return Ok(Err(not_row_wise(query)));
        }
    }
    if new.files.is_empty() {
        return Ok(Ok(frames));
    }
    let history = ctx.table_provider(tables::EVENTS).await?;
    let fresh = new_events_table(engine, &new.files).await?;
    ctx.deregister_table(tables::EVENTS)?;
    ctx.register_table(tables::EVENTS, fresh)?;
    let mut planned = Ok(());
    for query in queries {
        match super::link_frame(engine, query, rules).await {
            Ok(df) => frames.push(df),
            Err(e) => {
                planned = Err(e);
                break;
            }
        }
    }
    ctx.deregister_table(tables::EVENTS)?;
    ctx.register_table(tables::EVENTS, history)?;
    planned?;
    Ok(Ok(frames))
}

/// The new event files as one table.
async fn new_events_table(engine: &Engine, files: &[String]) -> Result<Arc<dyn TableProvider>> {
    use datafusion::datasource::listing::{
        ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
    };
    let urls = files
        .iter()
        .map(ListingTableUrl::parse)
        .collect::<datafusion::error::Result<Vec<_>>>()?;
    let options = ListingOptions::new(Arc::new(
        datafusion::datasource::file_format::parquet::ParquetFormat::default(),
    ))
    .with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .infer_schema(&engine.ctx.state())
        .await?;
    Ok(Arc::new(ListingTable::try_new(config)?))
}

/// How events find their profile when the project can resolve by groups: without
/// probabilistic blocks, and with each event's identifiers evaluated on the event itself.
async fn direct(
    engine: &Engine,
    queries: &[QueryFile],
    rules: &Rules,
) -> Result<std::result::Result<Vec<(u8, Expr)>, Fallback>> {
    if !engine.project.config.identity.probabilistic.is_empty() {
        return Ok(Err("probabilistic blocks score over every record".into()));
    }
    let mut event_sources = 0;
    for query in queries {
        let df = super::link_frame(engine, query, rules).await?;
        event_sources += usize::from(
            df.schema()
                .has_column_with_unqualified_name(super::MESSAGE_ID),
        );
    }
    Ok(
        match super::direct_identifiers(engine, queries, event_sources, rules).await? {
            Some(d) => Ok(d),
            None => {
                Err("events find their profile through a message_id mapping of every event".into())
            }
        },
    )
}

/// What an incremental run's identity would resolve, for `tessera plan`: `Ok` when it can
/// resolve only the groups its new events reach, otherwise why it resolves every group.
pub async fn plan(engine: &Engine) -> Result<std::result::Result<(), Fallback>> {
    let rules = Rules::from_config(&engine.project.config.identity);
    let queries = super::load_queries(engine)?;
    if let Err(why) = direct(engine, &queries, &rules).await? {
        return Ok(Err(why));
    }
    for query in &queries {
        let df = super::link_frame(engine, query, &rules).await?;
        if !row_wise(df.logical_plan()) {
            return Ok(Err(not_row_wise(query)));
        }
    }
    Ok(check_meta(engine, &fingerprint(engine, &queries))
        .await?
        .map(|_| ()))
}

fn not_row_wise(query: &QueryFile) -> Fallback {
    format!(
        "identity query {} is not row-wise over `events` (it aggregates, joins, limits or reads another table)",
        query.file
    )
}

/// Resolves only the groups the new events reach; `Ok(Err(why))` when the kept groups cannot
/// be used (the caller then resolves everything).
pub async fn resolve(
    engine: &Engine,
    run_id: &str,
    now: DateTime<Utc>,
    new: &NewEvents,
) -> Result<std::result::Result<IdentityTables, Fallback>> {
    let started = std::time::Instant::now();
    let rules = Rules::from_config(&engine.project.config.identity);
    let queries = super::load_queries(engine)?;
    let direct = match direct(engine, &queries, &rules).await? {
        Ok(d) => d,
        Err(why) => return Ok(Err(why)),
    };
    let frames = match new_rows(engine, &queries, &rules, new).await? {
        Ok(f) => f,
        Err(why) => return Ok(Err(why)),
    };
    let fingerprint = fingerprint(engine, &queries);
    let kept = match load(engine, &rules, &fingerprint).await? {
        Ok(k) => k,
        Err(why) => return Ok(Err(why)),
    };

    // The new rows, read as a full run reads them.
    let mut fresh = Resolver::new(rules.clone());
    for (q, (query, df)) in queries.iter().zip(frames).enumerate() {
        for (part, _) in super::read_links(df, &query.file, &rules, q as u16, false).await? {
            fresh.absorb(part);
        }
    }
    // The groups of the new rows' identifiers: one pass over the kept identifiers.
    let mut fresh_ids = IdSet::new(rules.types.len());
    for (t, v) in fresh.identifiers() {
        fresh_ids.insert(t, v);
    }
    let mut touched: HashSet<i64> = HashSet::default();
    for batch in &kept.ids {
        let (g, t, v) = (
            groups_column(batch),
            texts(batch, "identifier_type"),
            texts(batch, "identifier_value"),
        );
        for r in 0..batch.num_rows() {
            if let Some(ty) = rules.type_index(t.value(r)) {
                if fresh_ids.contains(ty, v.value(r)) {
                    touched.insert(g.value(r));
                }
            }
        }
    }
    drop(fresh_ids);
    // A shared value is a group of its own, and the links refused because of it are kept
    // with the group of their other side: resolving those links again needs the shared
    // value's group too (its identifier row and the values dropped beside it).
    loop {
        let mut more = Vec::new();
        for batch in &kept.links {
            let (g, kind, t, v) = (
                groups_column(batch),
                texts(batch, "kind"),
                texts(batch, "identifier_type"),
                texts(batch, "identifier_value"),
            );
            for r in 0..batch.num_rows() {
                if kind.value(r) != KIND_LINK || !touched.contains(&g.value(r)) {
                    continue;
                }
                let Some(ty) = rules.type_index(t.value(r)) else {
                    continue;
                };
                // Only a shared value is in another group than its link.
                if let Some(side) = kept.shared_group(ty, v.value(r)) {
                    if !touched.contains(&side) {
                        more.push(side);
                    }
                }
            }
        }
        if more.is_empty() {
            break;
        }
        touched.extend(more);
    }
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        groups = touched.len(),
        "identity: new links read, groups found"
    );

    // The touched groups again, from what was kept, plus the new rows.
    let mut resolver = Resolver::new(rules.clone());
    let mut nodes = Vec::new();
    let mut touched_ids = IdSet::new(rules.types.len());
    for batch in &kept.ids {
        let (g, t, v) = (
            groups_column(batch),
            texts(batch, "identifier_type"),
            texts(batch, "identifier_value"),
        );
        let (first, last) = (times(batch, "first_seen"), times(batch, "last_seen"));
        for r in 0..batch.num_rows() {
            if !touched.contains(&g.value(r)) {
                continue;
            }
            let ty = rules.type_index(t.value(r)).unwrap_or(0);
            touched_ids.insert(ty, v.value(r));
            let row = [(ty, v.value(r))];
            resolver.add_row(&row, time_at(&first, r), 0, &mut nodes);
            resolver.add_row(&row, time_at(&last, r), 0, &mut nodes);
        }
    }
    for batch in &kept.links {
        let g = groups_column(batch);
        let (t, v, ot, ov) = (
            texts(batch, "identifier_type"),
            texts(batch, "identifier_value"),
            texts(batch, "other_type"),
            texts(batch, "other_value"),
        );
        let seen = times(batch, "seen_at");
        let query = batch
            .column_by_name("query")
            .expect("conformed")
            .as_primitive::<arrow::datatypes::Int32Type>();
        for r in 0..batch.num_rows() {
            if !touched.contains(&g.value(r)) {
                continue;
            }
            let (Some(a), Some(b)) = (rules.type_index(t.value(r)), rules.type_index(ot.value(r)))
            else {
                return Ok(Err("a kept link names an unknown identifier type".into()));
            };
            let q = query.value(r);
            if q < 0 || q as usize >= queries.len() {
                return Ok(Err("a kept link names a query that is gone".into()));
            }
            // add_row puts the row in priority order, as the query's row was.
            let row = [(a, v.value(r)), (b, ov.value(r))];
            resolver.add_row(&row, time_at(&seen, r), q as u16, &mut nodes);
        }
    }
    resolver.absorb(fresh);
    let resolution = resolver.resolve_with_shared(|t, v| kept.shared_group(t, v).is_some());
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        identifiers = resolution.len(),
        "identity: touched groups resolved"
    );

    // Profile ids as a resolution of everything gives them: the published profiles of the
    // touched groups are the candidates; every published id stays taken.
    let in_touched = |t: u8, v: &str| touched_ids.contains(t, v);
    // What each pass over the whole tables costs, for the log.
    let mut step = std::time::Instant::now();
    let mut lap = || {
        let ms = step.elapsed().as_millis() as u64;
        step = std::time::Instant::now();
        ms
    };
    let previous = super::previous_graph(engine, &resolution, Some(&in_touched)).await?;
    let ids = super::assign_profile_ids(&resolution, &previous);
    let changed_profiles = super::changed_profiles(&resolution, &ids, &previous);
    let mut tables = super::build_tables(
        &resolution,
        &ids,
        &queries,
        EventIds::default(),
        run_id,
        now,
    )?;
    let previous_ms = lap();

    // Every other group keeps its published rows.
    let keep = |t: &str, v: &str| -> bool {
        match rules.type_index(t) {
            Some(ty) => !in_touched(ty, v),
            None => true,
        }
    };
    tables.graph = with_kept(
        engine,
        tables::IDENTITY_GRAPH,
        tables.graph,
        ("identifier_type", "identifier_value"),
        &keep,
    )
    .await?;
    let graph_kept_ms = lap();
    tables.graph = sort_graph(tables.graph, &rules)?;
    let sort_ms = lap();
    tables.links = with_kept(
        engine,
        tables::IDENTITY_LINKS,
        tables.links,
        ("identifier_type", "identifier_value"),
        &keep,
    )
    .await?;
    tables.conflicts = with_kept(
        engine,
        tables::IDENTITY_CONFLICTS,
        tables.conflicts,
        ("other_type", "other_value"),
        &keep,
    )
    .await?;
    let others_kept_ms = lap();
    tables.stats.identifiers = tables.graph.num_rows() as u64;
    tables.stats.profiles = sorted_distinct(texts(&tables.graph, "profile_id"));
    tables.stats.links_accepted = tables.links.num_rows() as u64;
    tables.stats.links_refused = tables.conflicts.num_rows() as u64;
    tables.event_profiles = EventProfiles::Direct(direct);
    tables.changed_profiles = changed_profiles;

    // The groups to keep: the untouched as they were, the touched as resolved now.
    let mut state = of_resolution(&resolution, &ids, fingerprint)?;
    let untouched = |batch: &RecordBatch| -> Result<RecordBatch> {
        let g = groups_column(batch);
        let mask: BooleanArray = (0..batch.num_rows())
            .map(|r| Some(!touched.contains(&g.value(r))))
            .collect();
        Ok(filter_record_batch(batch, &mask)?)
    };
    // Kept as the batches they are: one table of them would copy every kept row again.
    let mut ids_out = kept.ids.iter().map(untouched).collect::<Result<Vec<_>>>()?;
    ids_out.extend(state.ids);
    state.ids = ids_out;
    let mut links_out = kept
        .links
        .iter()
        .map(untouched)
        .collect::<Result<Vec<_>>>()?;
    links_out.extend(state.links);
    state.links = links_out;
    tables.groups = Some(state);
    let state_ms = lap();
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        groups = touched.len(),
        identifiers = resolution.len(),
        new_files = new.files.len(),
        previous_ms,
        graph_kept_ms,
        sort_ms,
        others_kept_ms,
        state_ms,
        "identity: resolved only the groups the new events reach"
    );
    Ok(Ok(tables))
}

/// `fresh` (this run's rows of the touched groups) with the published rows of `name` whose
/// identifier (the `key` columns) is in an untouched group.
async fn with_kept(
    engine: &Engine,
    name: &str,
    fresh: RecordBatch,
    key: (&str, &str),
    keep: &dyn Fn(&str, &str) -> bool,
) -> Result<RecordBatch> {
    let schema = fresh.schema();
    let Some(published) = read_all(engine, name, &schema).await? else {
        return Ok(fresh);
    };
    let mut parts = Vec::with_capacity(published.len() + 1);
    for batch in &published {
        let (t, v) = (texts(batch, key.0), texts(batch, key.1));
        let mask: BooleanArray = (0..batch.num_rows())
            .map(|r| Some(keep(t.value(r), v.value(r))))
            .collect();
        parts.push(filter_record_batch(batch, &mask)?);
    }
    parts.push(fresh);
    Ok(concat_batches(&schema, &parts)?)
}

/// Distinct non-null values of `sorted`, whose equal values sit together.
fn sorted_distinct(sorted: &StringArray) -> u64 {
    let mut count = 0;
    let mut last: Option<&str> = None;
    for v in sorted.iter().flatten() {
        if last != Some(v) {
            count += 1;
            last = Some(v);
        }
    }
    count
}

/// `identity_graph` in its published order: profile, then type priority, then value.
///
/// Profile ids that Tessera wrote (`p_` and 16 hex digits) sort as their numbers, so the sort
/// compares a number and a rank per row and looks at the values only within a profile; any
/// other id sends the whole table through Arrow's general sort (at 100M events, 17.3M rows).
fn sort_graph(graph: RecordBatch, rules: &Rules) -> Result<RecordBatch> {
    let types = texts(&graph, "identifier_type");
    let rank: UInt8Array = types
        .iter()
        .map(|t| t.and_then(|t| rules.type_index(t)))
        .collect();
    let profiles = texts(&graph, "profile_id");
    let values = texts(&graph, "identifier_value");
    let rows = graph.num_rows();
    let numbered: Option<Vec<(u64, u8, u32)>> = (0..rows)
        .map(|r| {
            if r > u32::MAX as usize {
                return None;
            }
            if profiles.is_null(r) || rank.is_null(r) || values.is_null(r) {
                return None;
            }
            let number = tables::profile_id_number(profiles.value(r))?;
            Some((number, rank.value(r), r as u32))
        })
        .collect();
    if let Some(mut keys) = numbered {
        keys.sort_unstable_by(|a, b| {
            (a.0, a.1)
                .cmp(&(b.0, b.1))
                .then_with(|| values.value(a.2 as usize).cmp(values.value(b.2 as usize)))
        });
        let order = arrow::array::UInt32Array::from_iter_values(keys.into_iter().map(|k| k.2));
        return Ok(arrow::compute::take_record_batch(&graph, &order)?);
    }
    let columns = [
        arrow::compute::SortColumn {
            values: graph.column_by_name("profile_id").expect("graph").clone(),
            options: None,
        },
        arrow::compute::SortColumn {
            values: Arc::new(rank),
            options: None,
        },
        arrow::compute::SortColumn {
            values: graph
                .column_by_name("identifier_value")
                .expect("graph")
                .clone(),
            options: None,
        },
    ];
    let order = arrow::compute::lexsort_to_indices(&columns, None)?;
    Ok(arrow::compute::take_record_batch(&graph, &order)?)
}

/// Union-find over node numbers, for grouping.
fn find(parent: &mut [Node], mut x: Node) -> Node {
    while parent[x as usize] != x {
        let grand = parent[parent[x as usize] as usize];
        parent[x as usize] = grand;
        x = grand;
    }
    x
}

/// A group's number: FNV-1a of its least identifier (by type priority, then value). It follows
/// from the group's members alone, so the kept state is the same whichever path resolved the
/// group (a full run, or an incremental one); two groups that happen to share a number are
/// only ever resolved together, which is correct, if slower.
fn group_number(kind: u8, value: &[u8]) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in std::iter::once(kind).chain(value.iter().copied()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// The groups of a resolution as `_state` rows.
pub(super) fn of_resolution(
    res: &Resolution,
    ids: &ProfileIds,
    fingerprint: String,
) -> Result<Groups> {
    let n = res.len();
    // Every node starts under its profile's component (a component's label is one of its
    // nodes, labelled by itself), so the accepted links, which lie inside components, need
    // no second pass: at 100M events that pass was millions of random reads.
    let mut parent: Vec<Node> = (0..n as Node)
        .map(|x| res.component(x).unwrap_or(x))
        .collect();
    let mut join = |a: Node, b: Node| {
        let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
        if ra != rb {
            parent[ra.max(rb) as usize] = ra.min(rb);
        }
    };
    for l in &res.accepted {
        if res.is_shared(l.low) || res.is_shared(l.top) {
            join(l.low, l.top);
        } else {
            debug_assert_eq!(res.component(l.low), res.component(l.top));
        }
    }
    // Links to a shared value are refused whatever else happens (it stays shared as links
    // are added), so they join nothing: a kiosk id does not make one group of everyone.
    for f in &res.refused {
        if let (Side::Node(a), Side::Node(b)) = (&f.refused, &f.other) {
            if !res.is_shared(*a) && !res.is_shared(*b) {
                join(*a, *b);
            }
        }
    }
    let mut least: Vec<Node> = vec![Node::MAX; n];
    for x in 0..n as Node {
        let root = find(&mut parent, x) as usize;
        let l = least[root];
        if l == Node::MAX || (res.kind(x), res.value_bytes(x)) < (res.kind(l), res.value_bytes(l)) {
            least[root] = x;
        }
    }
    let group: Vec<i64> = (0..n as Node)
        .map(|x| {
            let l = least[find(&mut parent, x) as usize];
            group_number(res.kind(l), res.value_bytes(l))
        })
        .collect();
    let profile_of =
        |x: Node| -> Option<&str> { res.component(x).map(|c| ids.ids[ids.of(c)].as_str()) };
    let type_name = |t: u8| res.rules().types[t as usize].name.as_str();
    let time = |t: i64| (t != NO_TIME).then_some(t);

    let nodes = 0..n as Node;
    let ids_batch = RecordBatch::try_new(
        ids_schema(),
        vec![
            Arc::new(Int64Array::from_iter_values(group.iter().copied())),
            Arc::new(StringArray::from_iter_values(
                nodes.clone().map(|x| type_name(res.kind(x))),
            )),
            Arc::new(StringArray::from_iter_values(
                nodes.clone().map(|x| res.value(x)),
            )),
            Arc::new(
                TimestampMicrosecondArray::from_iter(nodes.clone().map(|x| time(res.seen(x).0)))
                    .with_timezone("UTC"),
            ),
            Arc::new(
                TimestampMicrosecondArray::from_iter(nodes.clone().map(|x| time(res.seen(x).1)))
                    .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from_iter(nodes.clone().map(profile_of))),
            Arc::new(BooleanArray::from_iter(
                nodes.map(|x| Some(res.is_shared(x))),
            )),
        ],
    )?;

    // (group, kind, type, value, other type, other value, seen_at, query, profile)
    type Row<'a> = (
        i64,
        &'static str,
        &'a str,
        String,
        &'a str,
        &'a str,
        i64,
        u16,
        Option<&'a str>,
    );
    let mut rows: Vec<Row> = Vec::with_capacity(res.accepted.len() + res.refused.len());
    for l in &res.accepted {
        rows.push((
            group[l.top as usize],
            KIND_LINK,
            type_name(res.kind(l.low)),
            res.value(l.low).to_string(),
            type_name(res.kind(l.top)),
            res.value(l.top),
            l.seen_at,
            l.query,
            profile_of(l.top),
        ));
    }
    for f in &res.refused {
        let Side::Node(other) = f.other else { continue };
        let (kind, t, v) = match &f.refused {
            Side::Node(x) => (
                KIND_LINK,
                type_name(res.kind(*x)),
                res.value(*x).to_string(),
            ),
            Side::Value(t, v) => (KIND_DROPPED, type_name(*t), v.clone()),
        };
        rows.push((
            group[other as usize],
            kind,
            t,
            v,
            type_name(res.kind(other)),
            res.value(other),
            f.seen_at,
            f.query,
            profile_of(other),
        ));
    }
    let links_batch = RecordBatch::try_new(
        links_schema(),
        vec![
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.2))),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.3.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.4))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.5))),
            Arc::new(
                TimestampMicrosecondArray::from_iter(rows.iter().map(|r| time(r.6)))
                    .with_timezone("UTC"),
            ),
            Arc::new(Int32Array::from_iter_values(
                rows.iter().map(|r| r.7 as i32),
            )),
            Arc::new(StringArray::from_iter(rows.iter().map(|r| r.8))),
        ],
    )?;
    Ok(Groups {
        ids: vec![ids_batch],
        links: vec![links_batch],
        fingerprint,
    })
}

/// Whether this project's identity can keep groups at all: no probabilistic blocks and every
/// identity query row-wise over `events` with events finding their profile directly.
pub async fn eligible(engine: &Engine, queries: &[QueryFile], rules: &Rules) -> Result<bool> {
    if !engine.project.config.identity.probabilistic.is_empty() {
        return Ok(false);
    }
    for query in queries {
        let df = super::link_frame(engine, query, rules).await?;
        if !row_wise(df.logical_plan()) {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_profiles_are_counted_from_the_sorted_graph() {
        let sorted = StringArray::from(vec![
            None,
            Some("p_a"),
            Some("p_a"),
            Some("p_b"),
            Some("p_c"),
            Some("p_c"),
        ]);
        assert_eq!(sorted_distinct(&sorted), 3);
        assert_eq!(sorted_distinct(&StringArray::from(Vec::<&str>::new())), 0);
    }

    #[test]
    fn the_graph_sorts_by_profile_number_as_by_its_text_and_other_ids_still_sort() {
        use crate::config::{IdentifierConfig, IdentityConfig, Normalize};
        let id = |name: &str| IdentifierConfig {
            name: name.into(),
            normalize: Normalize::Trim,
            limit: None,
            blocklist: Vec::new(),
            max_links: None,
        };
        let rules = Rules::from_config(&IdentityConfig {
            identifiers: vec![id("user_id"), id("email"), id("anonymous_id")],
            default_country_code: "1".into(),
            probabilistic: Vec::new(),
        });
        let names = ["user_id", "email", "anonymous_id"];
        // Pseudo-random rows: 3000 identifiers over 400 profiles, types and values mixed.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let rows: Vec<(String, String, String)> = (0..3000)
            .map(|i| {
                let r = next();
                (
                    names[(r % 3) as usize].to_string(),
                    format!("v{}", (r >> 8) % 50_000 + i),
                    tables::profile_id_text((r >> 32) % 400 * 0x1_0000_0001),
                )
            })
            .collect();
        let batch = |rows: &[(String, String, String)]| {
            RecordBatch::try_new(
                Arc::new(Schema::new(vec![
                    Field::new("identifier_type", DataType::Utf8, false),
                    Field::new("identifier_value", DataType::Utf8, false),
                    Field::new("profile_id", DataType::Utf8, false),
                ])),
                vec![
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.0))),
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.1))),
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.2))),
                ],
            )
            .unwrap()
        };
        let listed = |b: &RecordBatch| -> Vec<(String, String, String)> {
            let (t, v, p) = (
                texts(b, "identifier_type"),
                texts(b, "identifier_value"),
                texts(b, "profile_id"),
            );
            (0..b.num_rows())
                .map(|r| (p.value(r).into(), t.value(r).into(), v.value(r).into()))
                .collect()
        };
        // Expected: by profile text, then type priority, then value.
        let mut expected: Vec<(String, String, String)> = rows
            .iter()
            .map(|r| (r.2.clone(), r.0.clone(), r.1.clone()))
            .collect();
        let rank = |t: &str| names.iter().position(|n| *n == t).unwrap();
        expected.sort_by(|a, b| (&a.0, rank(&a.1), &a.2).cmp(&(&b.0, rank(&b.1), &b.2)));
        assert_eq!(listed(&sort_graph(batch(&rows), &rules).unwrap()), expected);

        // One id Tessera did not write: the general sort, to the same order.
        let mut other = rows.clone();
        other[17].2 = "legacy-profile".into();
        let mut expected: Vec<(String, String, String)> = other
            .iter()
            .map(|r| (r.2.clone(), r.0.clone(), r.1.clone()))
            .collect();
        expected.sort_by(|a, b| (&a.0, rank(&a.1), &a.2).cmp(&(&b.0, rank(&b.1), &b.2)));
        assert_eq!(
            listed(&sort_graph(batch(&other), &rules).unwrap()),
            expected
        );
    }

    #[test]
    fn a_group_holds_every_candidate_link_refused_ones_included() {
        use crate::config::{IdentifierConfig, IdentityConfig, Normalize};
        let id = |name: &str, limit: Option<u64>, max: Option<u64>| IdentifierConfig {
            name: name.into(),
            normalize: Normalize::Trim,
            limit,
            blocklist: vec!["blocked".into()],
            max_links: max,
        };
        let rules = Rules::from_config(&IdentityConfig {
            identifiers: vec![
                id("user_id", Some(1), None),
                id("anonymous_id", None, Some(2)),
            ],
            default_country_code: "1".into(),
            probabilistic: Vec::new(),
        });
        let mut r = Resolver::new(rules);
        let mut nodes = Vec::new();
        // a1 joins u1; the limit refuses u2 on a1, yet u2 is in a1's group.
        r.add_row(&[(0, "u1"), (1, "a1")], 1, 0, &mut nodes);
        r.add_row(&[(0, "u2"), (1, "a1")], 2, 0, &mut nodes);
        // u3 alone, with a blocklisted anonymous id hanging off it.
        r.add_row(&[(0, "u3"), (1, "blocked")], 3, 0, &mut nodes);
        let res = r.resolve();
        let ids = ProfileIds {
            of_root: (0..res.len() as u32).collect::<Vec<_>>(),
            ids: (0..res.len()).map(|i| format!("p{i}")).collect(),
            merges: Vec::new(),
        };
        let groups = of_resolution(&res, &ids, String::new()).unwrap();
        let g = groups_column(&groups.ids[0]);
        let v = texts(&groups.ids[0], "identifier_value");
        let of = |value: &str| {
            (0..v.len())
                .find(|&r| v.value(r) == value)
                .map(|r| g.value(r))
        };
        assert_eq!(of("u1"), of("a1"));
        assert_eq!(of("u2"), of("a1"));
        assert_ne!(of("u3"), of("a1"));
        // Numbered by the least member, whichever order the graph was built in.
        assert_eq!(of("a1"), Some(group_number(0, b"u1")));
        let kinds: Vec<&str> = texts(&groups.links[0], "kind").iter().flatten().collect();
        assert_eq!(kinds.iter().filter(|k| **k == KIND_LINK).count(), 2);
        assert_eq!(kinds.iter().filter(|k| **k == KIND_DROPPED).count(), 1);
    }
}
