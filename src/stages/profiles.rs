//! `profiles`: one row per profile — when it was first and last seen, how many events, every
//! identifier it holds, its last-known identify traits, and the computed traits that
//! `queries/traits/*.sql` add.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, ListBuilder, RecordBatch, StringBuilder, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::{Column, JoinType};
use datafusion::dataframe::DataFrame;
use datafusion::logical_expr::{cast, col, Expr};
use futures::StreamExt;

use crate::config::QueryFile;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::stages::identity::graph::Rules;
use crate::stages::incremental_traits::Carry;
use crate::stages::windows::Windows;
use crate::tables;
use crate::tables::timestamp_type;

/// The column of `profiles` holding every last-known trait as a JSON object.
pub const TRAITS: &str = "traits";
/// Internal name for a computed trait file's key while it is joined.
const TRAIT_KEY: &str = "__tessera_trait_profile_id";

/// Internal table: one row per profile with its identifier lists.
const IDENTIFIER_LISTS: &str = "__tessera_identifier_lists";

/// The name of a profile's list column for an identifier type (`email` → `emails`).
pub fn list_column(identifier_type: &str) -> String {
    format!("{identifier_type}s")
}

/// Builds `profiles` (collected in memory) and registers it as `profiles` for later SQL;
/// `trait_files` are the project's trait queries.
///
/// With `carry` (an incremental run), trait files that allow it are run over the changed
/// profiles' events only, and the other profiles keep their published values
/// ([`crate::stages::incremental_traits`]); at a moved as-of, a trait file that reads the
/// time within windows runs over the touched profiles and those whose windows moved
/// ([`crate::stages::windows`]), which `windows` is told of.
pub async fn build(
    engine: &Engine,
    graph: &RecordBatch,
    trait_files: &[QueryFile],
    carry: Option<&Carry>,
    windows: &mut Windows,
) -> Result<Vec<RecordBatch>> {
    // Event counts and last-known traits are joined onto the profiles by profile_id (and trait
    // queries may join). A hash join holds its whole build side in memory and cannot spill: at
    // 100M events (3.8M profiles) the profile joins once needed over 4 GiB. Under a smaller
    // limit, sort-merge joins, which spill, are planned instead.
    let spillable = engine.limits.memory < SPILLABLE_JOINS_BELOW;
    set_prefer_hash_join(engine, !spillable);
    let built = build_inner(engine, graph, trait_files, carry, windows).await;
    set_prefer_hash_join(engine, true);
    built
}

/// How the query time limit names the profiles' own query (identifiers, event counts,
/// last-known traits).
const BUILT_IN_PROFILES: &str =
    "Tessera's profiles query (identifiers, event counts, last-known traits)";

/// Memory limits under which the profile joins are sort-merge joins.
const SPILLABLE_JOINS_BELOW: u64 = 8 << 30;

fn set_prefer_hash_join(engine: &Engine, hash: bool) {
    engine
        .ctx
        .state_ref()
        .write()
        .config_mut()
        .options_mut()
        .optimizer
        .prefer_hash_join = hash;
}

async fn build_inner(
    engine: &Engine,
    graph: &RecordBatch,
    trait_files: &[QueryFile],
    carry: Option<&Carry>,
    windows: &mut Windows,
) -> Result<Vec<RecordBatch>> {
    let rules = Rules::from_config(&engine.project.config.identity);
    let types: Vec<&str> = rules.types.iter().map(|t| t.name.as_str()).collect();
    engine.ctx.deregister_table(IDENTIFIER_LISTS)?;
    engine
        .ctx
        .register_batch(IDENTIFIER_LISTS, identifier_lists(graph, &types)?)?;
    let list_names: Vec<String> = types
        .iter()
        .map(|t| format!("g.{}", list_column(t)))
        .collect();
    // First and last seen and the event count, from the sessions when this run cut them: every
    // event with a profile is in exactly one session, so their minimum start, maximum end and
    // summed counts are the events' own, from a fifth as many rows (100M events: 19M sessions).
    let seen = if engine.ctx.table_exist(tables::SESSIONS)? {
        format!(
            "SELECT profile_id, min(started_at) AS first_seen, max(ended_at) AS last_seen, \
                    CAST(sum(event_count) AS BIGINT) AS event_count \
             FROM {sessions} WHERE profile_id IS NOT NULL GROUP BY profile_id",
            sessions = tables::SESSIONS
        )
    } else {
        format!(
            "SELECT profile_id, min(\"timestamp\") AS first_seen, max(\"timestamp\") AS last_seen, count(*) AS event_count \
             FROM {events} WHERE profile_id IS NOT NULL GROUP BY profile_id",
            events = tables::EVENTS
        )
    };
    let base = format!(
        "WITH e AS ({seen}) \
         SELECT g.profile_id, e.first_seen, e.last_seen, coalesce(e.event_count, 0) AS event_count, {list_names} \
         FROM {IDENTIFIER_LISTS} g LEFT JOIN e ON g.profile_id = e.profile_id",
        list_names = list_names.join(", "),
    );
    let mut profiles = engine.ctx.sql(&base).await?;
    let t0 = std::time::Instant::now();

    // Last-known identify traits: the latest non-null value of each trait wins.
    let (traits, traits_for) = engine
        .in_time(BUILT_IN_PROFILES, last_known(engine, carry))
        .await?;
    let base: HashSet<String> = profiles
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    if let Some(clash) = engine
        .project
        .config
        .profiles
        .traits
        .iter()
        .find(|t| base.contains(*t) || *t == TRAITS)
    {
        return Err(Error::Config {
            file: engine.project.config_file.clone(),
            key: Some("profiles.traits".into()),
            message: format!("key `profiles.traits`: trait \"{clash}\" has the name of a built-in profiles column; lift it under another name with a trait query"),
        });
    }
    tracing::info!(
        ms = t0.elapsed().as_millis() as u64,
        computed_for = traits_for,
        "last-known traits"
    );
    profiles = join_on_profile(profiles, traits, TRAIT_KEY)?;

    // Register the base so computed traits can read `profiles`, then add them file by file.
    let schema = profiles.schema().as_arrow().clone();
    let mut collected = engine
        .in_time(BUILT_IN_PROFILES, async { Ok(profiles.collect().await?) })
        .await?;
    if collected.is_empty() {
        collected.push(RecordBatch::new_empty(Arc::new(schema.clone())));
    }
    register(engine, &collected)?;
    tracing::info!(ms = t0.elapsed().as_millis() as u64, "base");
    // Computed traits are put onto the profiles by id: one map from each profile's id to its
    // row, then per trait file one lookup per returned row and a gather per column. (A chain of
    // LEFT JOINs copied every profile column again for every file: 6.9 s at 100M events.)
    let mut fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| crate::tables::plain_field(f))
        .collect();
    let mut columns: HashSet<String> = fields.iter().map(|f| f.name().clone()).collect();
    let key = schema.index_of("profile_id")?;
    let profile_ids = collected
        .iter()
        .map(|b| arrow::compute::cast(b.column(key), &DataType::Utf8))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let total: usize = collected.iter().map(RecordBatch::num_rows).sum();
    let mut row_of: std::collections::HashMap<&str, u32, foldhash::fast::RandomState> =
        std::collections::HashMap::with_capacity_and_hasher(total, Default::default());
    for (row, id) in profile_ids
        .iter()
        .flat_map(|ids| ids.as_string::<i32>().iter())
        .enumerate()
    {
        if let Some(id) = id {
            row_of.entry(id).or_insert(row as u32);
        }
    }
    let mut added: Vec<Vec<ArrayRef>> = vec![Vec::new(); collected.len()];
    for query in trait_files {
        let df = engine.query(&query.sql, &query.file).await?;
        let schema = df.schema().as_arrow().clone();
        if schema.index_of("profile_id").is_err() {
            return Err(Error::query(&query.file, "returns no `profile_id` column; a trait query returns profile_id plus trait columns"));
        }
        for f in schema.fields() {
            if f.name() != "profile_id" && !columns.insert(f.name().clone()) {
                return Err(Error::query(
                    &query.file,
                    format!("column `{}` is already a column of profiles (built in, a configured trait, or another trait file); rename it", f.name()),
                ));
            }
        }
        let plan = df.logical_plan().clone();
        let unmoved = carry.filter(|c| c.applies(&query.file, &query.sql, &plan));
        // At a moved as-of: the published values must be those the windows were recorded for.
        let due = match carry {
            Some(c) if unmoved.is_none() => windows
                .over(&query.file, &query.sql, &plan)
                .filter(|_| {
                    let at = c.recorded_at(&query.file, &query.sql);
                    at.is_some() && at == windows.recorded_at(&query.file)
                })
                .map(|over| (c, over)),
            _ => None,
        };
        let (batches, computed_for) = engine
            .in_time(&query.file, async {
                if let Some(carry) = unmoved {
                    if let Some(kept) = carry.kept(&schema)? {
                        let mut batches =
                            query_over(engine, carry.changed_events(), &query.sql, &query.file)
                                .await?
                                .collect()
                                .await
                                .map_err(|e| Error::query(&query.file, e))?;
                        batches.extend(kept.collect().await?);
                        return Ok((batches, "changed profiles"));
                    }
                }
                if let Some((carry, (profiles, events))) = due {
                    if let Some(kept) = carry.kept_except(&schema, profiles)? {
                        let mut batches = query_over(engine, events, &query.sql, &query.file)
                            .await?
                            .collect()
                            .await
                            .map_err(|e| Error::query(&query.file, e))?;
                        batches.extend(kept.collect().await?);
                        return Ok((batches, crate::stages::windows::DUE));
                    }
                }
                Ok((engine.collect(df, &query.file).await?, "every profile"))
            })
            .await?;
        windows.computed(
            &query.file,
            &query.sql,
            &plan,
            computed_for == "every profile",
        );
        // Gathered from the batches as they are (one array of them all could pass the 2 GiB
        // a string array holds); a one-row batch of NULLs, after them, serves profiles with
        // no row.
        let none = batches.len() as u32;
        let key = schema.index_of("profile_id").expect("checked");
        let ids = batches
            .iter()
            .map(|b| arrow::compute::cast(b.column(key), &DataType::Utf8))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        // For every profile row, the (batch, row) of its profile's trait row.
        let mut take: Vec<(u32, u32)> = vec![(none, 0); total];
        // Ids of no profile are dropped, as a LEFT JOIN drops them, but must not repeat either.
        let mut others: HashSet<&str, foldhash::fast::RandomState> = HashSet::default();
        for (b, ids) in ids.iter().enumerate() {
            for (r, id) in ids.as_string::<i32>().iter().enumerate() {
                let Some(id) = id else { continue };
                let repeated = match row_of.get(id) {
                    Some(&row) => {
                        let was = std::mem::replace(&mut take[row as usize], (b as u32, r as u32));
                        was.0 != none
                    }
                    None => !others.insert(id),
                };
                if repeated {
                    return Err(Error::query(
                        &query.file,
                        format!("returns profile_id {id} more than once; a trait query returns one row per profile (GROUP BY profile_id)"),
                    ));
                }
            }
        }
        let trait_columns: Vec<usize> = (0..schema.fields().len()).filter(|&i| i != key).collect();
        let nulls: Vec<ArrayRef> = trait_columns
            .iter()
            .map(|&i| arrow::array::new_null_array(schema.field(i).data_type(), 1))
            .collect();
        let mut offset = 0;
        for (b, batch) in collected.iter().enumerate() {
            let rows: Vec<(usize, usize)> = take[offset..offset + batch.num_rows()]
                .iter()
                .map(|&(b, r)| (b as usize, r as usize))
                .collect();
            offset += batch.num_rows();
            for (&i, nulls) in trait_columns.iter().zip(&nulls) {
                let sources: Vec<&dyn Array> = batches
                    .iter()
                    .map(|t| t.column(i).as_ref())
                    .chain([nulls.as_ref()])
                    .collect();
                added[b].push(arrow::compute::interleave(&sources, &rows)?);
            }
        }
        fields.extend(
            schema
                .fields()
                .iter()
                .filter(|f| f.name() != "profile_id")
                .map(|f| crate::tables::plain_field(f).with_nullable(true)),
        );
        tracing::info!(ms = t0.elapsed().as_millis() as u64, file = %query.file, computed_for, "trait");
    }
    drop(row_of);
    drop(profile_ids);
    let schema = Arc::new(Schema::new(fields));
    let collected = collected
        .into_iter()
        .zip(added)
        .map(|(batch, added)| {
            // Plain string types in the output (see `output::plain_columns`).
            let all = batch
                .columns()
                .iter()
                .cloned()
                .chain(added)
                .zip(schema.fields())
                .map(|(column, field)| {
                    if column.data_type() == field.data_type() {
                        Ok(column)
                    } else {
                        arrow::compute::cast(&column, field.data_type())
                    }
                })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Ok(RecordBatch::try_new(schema.clone(), all)?)
        })
        .collect::<Result<Vec<_>>>()?;
    tracing::info!(ms = t0.elapsed().as_millis() as u64, "joined");
    register(engine, &collected)?;
    Ok(collected)
}

/// One row per profile of `graph` (an `identity_graph` batch ordered by profile, type priority,
/// value) with one list column per identifier type: its values in order, NULL when it has none.
/// One pass over the graph; an `array_agg(... ORDER BY ...)` per type took most of the stage.
/// Whether every value of `ids` (text) sits in one run of equal values.
fn grouped(ids: &ArrayRef) -> bool {
    let ids = ids.as_string::<i32>();
    let mut done: HashSet<&str> = HashSet::new();
    let mut last: Option<&str> = None;
    for id in ids.iter().flatten() {
        if last != Some(id) {
            if let Some(previous) = last {
                done.insert(previous);
            }
            if done.contains(id) {
                return false;
            }
            last = Some(id);
        }
    }
    true
}

fn identifier_lists(graph: &RecordBatch, types: &[&str]) -> Result<RecordBatch> {
    // One profile's identifiers must be next to each other. The identity stage hands them
    // over that way; the published graph, read back from several files when identity was not
    // recomputed, need not be, and a profile split in two became two rows of `profiles`.
    let sorted;
    let graph = match graph.column_by_name("profile_id") {
        Some(p) if !grouped(&arrow::compute::cast(p, &DataType::Utf8)?) => {
            let indices = arrow::compute::sort_to_indices(p, None, None)?;
            sorted = arrow::compute::take_record_batch(graph, &indices)?;
            &sorted
        }
        _ => graph,
    };
    let column = |name: &str| -> Result<ArrayRef> {
        let c = graph
            .column_by_name(name)
            .ok_or_else(|| Error::Usage(format!("identity graph without column {name}")))?;
        Ok(arrow::compute::cast(c, &DataType::Utf8)?)
    };
    let (ty, value, profile) = (
        column("identifier_type")?,
        column("identifier_value")?,
        column("profile_id")?,
    );
    let (ty, value, profile) = (
        ty.as_string::<i32>(),
        value.as_string::<i32>(),
        profile.as_string::<i32>(),
    );
    let mut ids = arrow::array::StringBuilder::new();
    let mut lists: Vec<ListBuilder<arrow::array::StringBuilder>> = types
        .iter()
        .map(|_| ListBuilder::new(arrow::array::StringBuilder::new()))
        .collect();
    // Values of the current profile, per type.
    let mut current: Vec<Vec<&str>> = vec![Vec::new(); types.len()];
    let flush = |current: &mut Vec<Vec<&str>>, lists: &mut Vec<ListBuilder<_>>| {
        for (values, list) in current.iter_mut().zip(lists.iter_mut()) {
            let list: &mut ListBuilder<arrow::array::StringBuilder> = list;
            if values.is_empty() {
                list.append_null();
            } else {
                values.sort_unstable();
                for v in values.iter() {
                    list.values().append_value(v);
                }
                list.append(true);
                values.clear();
            }
        }
    };
    let mut last: Option<&str> = None;
    for r in 0..graph.num_rows() {
        if profile.is_null(r) {
            continue;
        }
        let p = profile.value(r);
        if last != Some(p) {
            if last.is_some() {
                flush(&mut current, &mut lists);
            }
            ids.append_value(p);
            last = Some(p);
        }
        if let Some(i) = types.iter().position(|t| *t == ty.value(r)) {
            current[i].push(value.value(r));
        }
    }
    if last.is_some() {
        flush(&mut current, &mut lists);
    }
    let mut fields = vec![Field::new("profile_id", DataType::Utf8, false)];
    let mut columns: Vec<ArrayRef> = vec![Arc::new(ids.finish())];
    for (t, mut list) in types.iter().zip(lists) {
        let array = list.finish();
        fields.push(Field::new(list_column(t), array.data_type().clone(), true));
        columns.push(Arc::new(array));
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}

/// profile → trait → (time, value): the latest non-null value of each identify trait.
/// A hash map: the rows are joined onto profiles by id, so their order does not matter.
type Latest = std::collections::HashMap<
    String,
    BTreeMap<String, (i64, serde_json::Value)>,
    foldhash::fast::RandomState,
>;

/// Folds one stream of `(profile, time, traits JSON)` rows into a [`Latest`].
async fn latest_traits(
    mut stream: datafusion::physical_plan::SendableRecordBatchStream,
) -> Result<Latest> {
    let mut latest = Latest::default();
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let (p, t, j) = (
            batch.column(0).as_string::<i32>(),
            batch
                .column(1)
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .expect("cast to µs"),
            batch.column(2).as_string::<i32>(),
        );
        for r in 0..batch.num_rows() {
            let Ok(serde_json::Value::Object(map)) =
                serde_json::from_str::<serde_json::Value>(j.value(r))
            else {
                continue;
            };
            let at = if t.is_valid(r) { t.value(r) } else { i64::MIN };
            let slot = match latest.get_mut(p.value(r)) {
                Some(slot) => slot,
                None => latest.entry(p.value(r).to_string()).or_default(),
            };
            for (k, v) in map {
                if !v.is_null() {
                    offer(slot, k, at, v);
                }
            }
        }
    }
    Ok(latest)
}

/// Keeps `v` for trait `k` if it is later than what `slot` holds, or as late and of greater
/// JSON text (so the result never depends on row order).
fn offer(
    slot: &mut BTreeMap<String, (i64, serde_json::Value)>,
    k: String,
    at: i64,
    v: serde_json::Value,
) {
    match slot.get(&k) {
        Some((when, _)) if *when > at => {}
        Some((when, old)) if *when == at && json_text(old) >= json_text(&v) => {}
        _ => {
            slot.insert(k, (at, v));
        }
    }
}

/// Merges `from` into `into`.
fn merge_latest(into: &mut Latest, from: Latest) {
    for (profile, traits) in from {
        let slot = into.entry(profile).or_default();
        for (k, (at, v)) in traits {
            offer(slot, k, at, v);
        }
    }
}

/// Writes `traits` as one JSON object, keys in their (sorted) order: the text serde_json
/// prints for the same object.
fn write_object(
    out: &mut Vec<u8>,
    traits: &BTreeMap<String, (i64, serde_json::Value)>,
) -> Result<()> {
    let failed = |e: serde_json::Error| Error::Internal(format!("writing identify traits: {e}"));
    out.push(b'{');
    for (i, (k, (_, v))) in traits.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, k).map_err(failed)?;
        out.push(b':');
        serde_json::to_writer(&mut *out, v).map_err(failed)?;
    }
    out.push(b'}');
    Ok(())
}

/// A JSON value as text, for breaking ties between values seen at the same time.
fn json_text(v: &serde_json::Value) -> String {
    v.to_string()
}

/// Plans `sql` with `events` naming the given table instead of all the events, then names
/// all the events `events` again (the plan keeps the table it was planned with).
async fn query_over(
    engine: &Engine,
    events: Arc<dyn datafusion::datasource::TableProvider>,
    sql: &str,
    file: &str,
) -> Result<DataFrame> {
    let all = engine.ctx.deregister_table(tables::EVENTS)?;
    let planned = match engine.ctx.register_table(tables::EVENTS, events) {
        Ok(_) => engine.query(sql, file).await,
        Err(e) => Err(e.into()),
    };
    engine.ctx.deregister_table(tables::EVENTS)?;
    if let Some(all) = all {
        engine.ctx.register_table(tables::EVENTS, all)?;
    }
    planned
}

fn register(engine: &Engine, batches: &[RecordBatch]) -> Result<()> {
    engine.ctx.deregister_table(tables::PROFILES)?;
    let schema = batches
        .first()
        .map(|b| b.schema())
        .unwrap_or_else(|| Arc::new(Schema::empty()));
    let table = datafusion::datasource::MemTable::try_new(schema, vec![batches.to_vec()])?;
    engine
        .ctx
        .register_table(tables::PROFILES, Arc::new(table))?;
    Ok(())
}

/// `left` LEFT JOIN `right` on profile_id, keeping one profile_id column.
fn join_on_profile(left: DataFrame, right: DataFrame, key: &str) -> Result<DataFrame> {
    let right_cols: Vec<Expr> = right
        .schema()
        .fields()
        .iter()
        .map(|f| {
            let c = Expr::Column(Column::new_unqualified(f.name()));
            if f.name() == "profile_id" {
                cast(c, DataType::Utf8).alias(key)
            } else {
                c
            }
        })
        .collect();
    let right = right.select(right_cols)?;
    let keep: Vec<Expr> = left
        .schema()
        .fields()
        .iter()
        .chain(right.schema().fields().iter())
        .filter(|f| f.name() != key)
        .map(|f| Expr::Column(Column::new_unqualified(f.name())))
        .collect();
    Ok(left
        .join(right, JoinType::Left, &["profile_id"], &[key], None)?
        .select(keep)?)
}

/// The name `_state/traits` records the last-known traits under, and what it fingerprints for
/// them: the lifted traits, since they are columns of the published values (Tessera's version
/// is part of every fingerprint). See [`last_known`].
pub fn last_known_state(project: &crate::config::Project) -> QueryFile {
    QueryFile {
        file: "[profiles] traits".to_string(),
        sql: format!(
            "last-known identify traits; lifted: {}",
            project.config.profiles.traits.join(", ")
        ),
        path: project.config_file.clone(),
    }
}

/// The last-known traits of the profiles (see [`last_known_traits`]) and for which profiles
/// they were computed. On an incremental run whose published values were computed the same way
/// (see [`last_known_state`]), only the changed profiles' events are read (they hold every
/// event of those profiles) and every other profile keeps its published values, as trait
/// files do ([`crate::stages::incremental_traits`]): at 10M events this read every identify event, 0.6 s
/// of a 10 s incremental run.
async fn last_known(engine: &Engine, carry: Option<&Carry>) -> Result<(DataFrame, &'static str)> {
    let state = last_known_state(&engine.project);
    if let Some(carry) = carry.filter(|c| c.recorded_as(&state.file, &state.sql)) {
        let changed = engine.ctx.read_table(carry.changed_events())?;
        let fresh = last_known_traits(engine, changed).await?;
        if let Some(kept) = carry.kept(&fresh.schema())? {
            // Profiles without identify traits have none to keep (they get NULLs either way).
            let kept = kept.filter(col(TRAITS).is_not_null())?.collect().await?;
            let schema = fresh.schema();
            let mut batches = vec![fresh];
            for batch in kept {
                batches.push(RecordBatch::try_new(
                    schema.clone(),
                    batch.columns().to_vec(),
                )?);
            }
            return Ok((engine.ctx.read_batches(batches)?, "changed profiles"));
        }
    }
    let all = engine.ctx.table(tables::EVENTS).await?;
    let traits = last_known_traits(engine, all).await?;
    Ok((engine.ctx.read_batch(traits)?, "every profile"))
}

/// Each profile's last-known identify traits in `events`: one row per profile with identify
/// traits, its traits as a JSON object and the lifted ones as columns (every field nullable).
async fn last_known_traits(engine: &Engine, events: DataFrame) -> Result<RecordBatch> {
    let lifted = &engine.project.config.profiles.traits;
    let df = events.filter(
        col("type")
            .eq(datafusion::logical_expr::lit("identify"))
            .and(col("profile_id").is_not_null())
            .and(col("traits").is_not_null()),
    )?;
    let df = df.select(vec![
        cast(col("profile_id"), DataType::Utf8).alias("p"),
        cast(col("timestamp"), timestamp_type()).alias("t"),
        cast(col("traits"), DataType::Utf8).alias("j"),
    ])?;
    // Each partition of the scan folds its rows on its own task; the maps are merged after.
    // The rule (latest time wins, ties to the greater JSON text) does not depend on order.
    // Returning early drops the set, which stops the other tasks.
    let mut tasks = tokio::task::JoinSet::new();
    for stream in df.execute_stream_partitioned().await? {
        tasks.spawn(latest_traits(stream));
    }
    let mut latest = Latest::default();
    while let Some(done) = tasks.join_next().await {
        let mut part =
            done.map_err(|e| Error::Internal(format!("reading identify traits stopped: {e}")))??;
        // Walk the smaller map.
        if part.len() > latest.len() {
            std::mem::swap(&mut latest, &mut part);
        }
        merge_latest(&mut latest, part);
    }
    // Nullable throughout: published values, which may stand beside these rows, are read so.
    let mut fields = vec![
        Field::new("profile_id", DataType::Utf8, true),
        Field::new(TRAITS, DataType::Utf8, true),
    ];
    fields.extend(
        lifted
            .iter()
            .map(|name| Field::new(name, DataType::Utf8, true)),
    );
    // Written straight into the columns: building a JSON value per profile to print it, and a
    // String per lifted trait, took half of this step (0.55 of 1.05 s at 10M events).
    let mut ids = StringBuilder::with_capacity(latest.len(), latest.len() * 20);
    let mut json = StringBuilder::with_capacity(latest.len(), latest.len() * 64);
    let mut lifted_columns: Vec<StringBuilder> =
        lifted.iter().map(|_| StringBuilder::new()).collect();
    let mut text = Vec::new();
    for (profile, traits) in &latest {
        ids.append_value(profile);
        text.clear();
        write_object(&mut text, traits)?;
        json.append_value(std::str::from_utf8(&text).expect("serde_json writes UTF-8"));
        for (name, column) in lifted.iter().zip(&mut lifted_columns) {
            match traits.get(name) {
                Some((_, serde_json::Value::String(s))) => column.append_value(s),
                Some((_, other)) => column.append_value(other.to_string()),
                None => column.append_null(),
            }
        }
    }
    let mut columns: Vec<ArrayRef> = vec![Arc::new(ids.finish()), Arc::new(json.finish())];
    columns.extend(
        lifted_columns
            .iter_mut()
            .map(|c| Arc::new(c.finish()) as ArrayRef),
    );
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_whose_identifiers_are_apart_is_still_one_row() {
        let graph = RecordBatch::try_from_iter([
            (
                "identifier_type",
                Arc::new(arrow::array::StringArray::from(vec![
                    "email",
                    "user_id",
                    "email",
                    "anonymous_id",
                ])) as ArrayRef,
            ),
            (
                "identifier_value",
                Arc::new(arrow::array::StringArray::from(vec![
                    "a@x", "u1", "b@x", "d1",
                ])),
            ),
            (
                "profile_id",
                Arc::new(arrow::array::StringArray::from(vec![
                    "p_1", "p_2", "p_2", "p_1",
                ])),
            ),
        ])
        .unwrap();
        let lists = identifier_lists(&graph, &["user_id", "email", "anonymous_id"]).unwrap();
        assert_eq!(lists.num_rows(), 2, "one row per profile");
        let ids = lists.column(0).as_string::<i32>();
        let emails = lists.column(2).as_list::<i32>();
        for row in 0..2 {
            let email = emails.value(row);
            let email = email.as_string::<i32>();
            let want = if ids.value(row) == "p_1" {
                "a@x"
            } else {
                "b@x"
            };
            assert_eq!(email.value(0), want);
        }
    }
    use serde_json::json;

    #[test]
    fn traits_are_written_as_serde_json_prints_them() {
        let mut traits = BTreeMap::new();
        for (k, v) in [
            ("plan", json!("pro")),
            ("name", json!("Zoë \"Z\" O'Neil\n\u{1}")),
            ("age", json!(41)),
            ("score", json!(0.5)),
            ("tags", json!(["a", {"b": null}])),
            ("address", json!({"city": "Oslo", "zip": "0150"})),
            ("quote\"key", json!(true)),
        ] {
            traits.insert(k.to_string(), (0, v));
        }
        let mut text = Vec::new();
        write_object(&mut text, &traits).unwrap();
        let expected = serde_json::Value::Object(
            traits
                .iter()
                .map(|(k, (_, v))| (k.clone(), v.clone()))
                .collect(),
        )
        .to_string();
        assert_eq!(String::from_utf8(text).unwrap(), expected);
        let mut empty = Vec::new();
        write_object(&mut empty, &BTreeMap::new()).unwrap();
        assert_eq!(empty, b"{}");
    }

    /// One partition's map: `rows` of (profile, time, trait, value).
    fn part(rows: &[(&str, i64, &str, serde_json::Value)]) -> Latest {
        let mut latest = Latest::default();
        for (p, at, k, v) in rows {
            offer(
                latest.entry(p.to_string()).or_default(),
                k.to_string(),
                *at,
                v.clone(),
            );
        }
        latest
    }

    fn merged(a: Latest, b: Latest) -> Vec<(String, String, i64, String)> {
        let mut into = a;
        merge_latest(&mut into, b);
        let mut rows: Vec<_> = into
            .into_iter()
            .flat_map(|(p, traits)| {
                traits
                    .into_iter()
                    .map(move |(k, (at, v))| (p.clone(), k, at, v.to_string()))
            })
            .collect();
        rows.sort();
        rows
    }

    #[test]
    fn partitions_merge_to_the_same_latest_values_in_either_order() {
        let a = || {
            part(&[
                ("p1", 10, "plan", json!("free")),
                ("p1", 30, "name", json!("Ann")),
                ("p2", 5, "plan", json!("pro")),
                ("p3", 7, "plan", json!("b")),
            ])
        };
        let b = || {
            part(&[
                ("p1", 20, "plan", json!("pro")),
                ("p1", 25, "name", json!("Anna")),
                // Same time as the other partition: the greater JSON text wins.
                ("p3", 7, "plan", json!("c")),
                ("p4", 1, "age", json!(40)),
            ])
        };
        let want = vec![
            ("p1".into(), "name".into(), 30, "\"Ann\"".into()),
            ("p1".into(), "plan".into(), 20, "\"pro\"".into()),
            ("p2".into(), "plan".into(), 5, "\"pro\"".into()),
            ("p3".into(), "plan".into(), 7, "\"c\"".into()),
            ("p4".into(), "age".into(), 1, "40".into()),
        ];
        assert_eq!(merged(a(), b()), want);
        assert_eq!(merged(b(), a()), want);
    }
}
