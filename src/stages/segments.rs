//! Segments: `queries/segments/<name>.sql` → `segments.<name>` for later SQL and
//! `<output>/segments/<name>` for campaigns. Run order comes from the tables each query names.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::array::{Array, ArrayBuilder, AsArray, RecordBatch};
use arrow::datatypes::DataType;
use datafusion::common::TableReference;
use datafusion::datasource::MemTable;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool, MemoryReservation};

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::tables;

/// One segment file.
#[derive(Debug, Clone)]
pub struct SegmentQuery {
    /// The segment's name: the file name without `.sql`.
    pub name: String,
    /// The file, relative to the project.
    pub file: String,
    /// Its SQL.
    pub sql: String,
    /// Segments it reads.
    pub needs: BTreeSet<String>,
}

/// The project's segments, in an order where each comes after the segments it reads.
pub fn ordered(engine: &Engine) -> Result<Vec<SegmentQuery>> {
    let mut all: BTreeMap<String, SegmentQuery> = BTreeMap::new();
    for query in engine.project.query_files("segments")? {
        let crate::config::QueryFile { file, sql, path } = query;
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        if !crate::config::is_sql_name(&name) {
            return Err(Error::query(&file, format!("`{name}` is not a usable segment name: name the file with lowercase letters, digits and _ (e.g. high_value.sql)")));
        }
        let statement = crate::engine::check_read_only(&engine.ctx, &sql, &file)?;
        let references = engine
            .ctx
            .state()
            .resolve_table_references(&statement)
            .map_err(|e| Error::query(&file, e))?;
        let needs = references
            .iter()
            .filter(|r| r.schema() == Some(tables::SEGMENTS))
            .map(|r| r.table().to_string())
            .collect();
        all.insert(
            name.clone(),
            SegmentQuery {
                name,
                file,
                sql,
                needs,
            },
        );
    }
    for s in all.values() {
        if let Some(missing) = s.needs.iter().find(|n| !all.contains_key(*n)) {
            return Err(Error::query(
                &s.file,
                format!("reads segments.{missing}, but there is no queries/segments/{missing}.sql"),
            ));
        }
    }
    // Kahn's algorithm, smallest name first, so the order is stable.
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::with_capacity(all.len());
    while out.len() < all.len() {
        let next = all
            .values()
            .find(|s| !done.contains(&s.name) && s.needs.iter().all(|n| done.contains(n)));
        match next {
            Some(s) => {
                done.insert(s.name.clone());
                out.push(s.clone());
            }
            None => {
                let stuck: Vec<&str> = all
                    .values()
                    .filter(|s| !done.contains(&s.name))
                    .map(|s| s.file.as_str())
                    .collect();
                return Err(Error::query(
                    stuck.join(", "),
                    "these segments read each other in a cycle; break it so each segment builds only on segments that do not read it back",
                ));
            }
        }
    }
    Ok(out)
}

/// A segment's member ids: the `profile_id` column of its rows, as plain strings.
///
/// Held as arrays and compared as borrowed strings: at 100M events the largest segments have
/// millions of members, and a copy of each id in an ordered set cost seconds. What the ids
/// and their sets take is charged to the engine's memory pool while they live (see
/// [`Members::reserve_sets`]).
#[derive(Debug, Default)]
pub struct Members {
    ids: Vec<arrow::array::StringArray>,
    /// The pool's share of ids this value owns alone (a previous version read back); `None`
    /// when the ids are the segment's result, whose reservation the engine keeps.
    held: Option<MemoryReservation>,
}

impl Members {
    /// The `profile_id` column of `batches`.
    pub fn of(batches: &[RecordBatch]) -> Result<Members> {
        let mut arrays = Vec::with_capacity(batches.len());
        for b in batches {
            let ids = arrow::compute::cast(
                b.column(b.schema().index_of("profile_id")?),
                &DataType::Utf8,
            )?;
            arrays.push(ids.as_string::<i32>().clone());
        }
        Ok(Members {
            ids: arrays,
            held: None,
        })
    }

    /// How many ids (nulls included).
    fn rows(&self) -> usize {
        self.ids.iter().map(|a| a.len()).sum()
    }

    /// How many members (for the run's warnings about segment sizes).
    pub fn len(&self) -> usize {
        self.rows()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.rows() == 0
    }

    /// Every member id (nulls skipped), in row order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.ids.iter().flat_map(|a| a.iter().flatten())
    }

    /// An empty set with room for every id.
    fn empty_set(&self) -> foldhash::HashSet<&str> {
        foldhash::HashSet::with_capacity_and_hasher(self.rows(), Default::default())
    }

    /// The ids as a set.
    fn set(&self) -> foldhash::HashSet<&str> {
        let mut set = self.empty_set();
        set.extend(self.ids());
        set
    }

    /// Grows `reservation` by what sets of these ids take (one per entry of `sets`), before
    /// they are made: a segment of a hundred million members needs gigabytes for them, and
    /// the pool, not the machine, says whether there is room.
    fn reserve_sets(&self, reservation: &MemoryReservation, sets: usize) -> Result<()> {
        reservation.try_grow(set_bytes(self.rows()) * sets)?;
        Ok(())
    }

    /// The first id that appears more than once; the set that finds it is charged to
    /// `reservation` while it lives.
    pub fn repeated(&self, reservation: &MemoryReservation) -> Result<Option<&str>> {
        let checking = reservation.new_empty();
        self.reserve_sets(&checking, 1)?;
        let mut seen = self.empty_set();
        Ok(self.ids().find(|id| !seen.insert(*id)))
    }
}

/// What a hash set of `rows` borrowed ids takes: its buckets (a `&str` each) and their
/// control bytes, at the load factor the set is built with.
fn set_bytes(rows: usize) -> usize {
    let buckets = (rows.saturating_mul(8) / 7).max(4).next_power_of_two();
    buckets * (std::mem::size_of::<&str>() + 1)
}

/// The members of a segment's current published version (none before its first run),
/// charged to the engine's memory pool while they live.
pub async fn published_members(engine: &Engine, segment: &SegmentQuery) -> Result<Members> {
    let table = format!("{}/{}", tables::SEGMENTS, segment.name);
    let Some(df) = engine.outputs.read(&engine.ctx, &table).await? else {
        return Ok(Members::default());
    };
    let df = crate::output::plain_columns(
        df.select(vec![datafusion::logical_expr::col("profile_id")])?,
    )?;
    let (batches, held) = engine
        .collect_reserved(
            df,
            &table,
            format!("segment {} (published members)", segment.name),
        )
        .await?;
    let mut members = Members::of(&batches)?;
    members.held = Some(held);
    Ok(members)
}

/// Rows of `segment_changes` kept in one batch at most; a batch is also cut once its ids take
/// [`Changes::CHUNK_BYTES`]. Bounded batches keep every string column far under the 2 GiB an
/// Arrow string array can address, however many members come and go.
const CHUNK_ROWS: usize = 64 * 1024;

/// `segment_changes` rows: who entered and who left each segment since its last version.
///
/// Rows are cut into bounded batches as they are added, and every finished batch is charged
/// to the engine's memory pool until the rows are taken.
#[derive(Debug)]
pub struct Changes {
    run_id: String,
    at: chrono::DateTime<chrono::Utc>,
    segment: arrow::array::StringBuilder,
    profile: arrow::array::StringBuilder,
    change: arrow::array::StringBuilder,
    done: Vec<RecordBatch>,
    reservation: MemoryReservation,
    chunk_bytes: usize,
}

impl Changes {
    /// String bytes (segment names and profile ids) after which a batch is cut.
    pub const CHUNK_BYTES: usize = 64 << 20;

    /// No changes yet; the rows will carry `run_id` and `at`, and what they take is charged
    /// to `pool`.
    pub fn new(
        pool: &Arc<dyn MemoryPool>,
        run_id: &str,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Changes {
        Changes {
            run_id: run_id.to_string(),
            at,
            segment: Default::default(),
            profile: Default::default(),
            change: Default::default(),
            done: Vec::new(),
            reservation: MemoryConsumer::new(tables::SEGMENT_CHANGES).register(pool),
            chunk_bytes: Self::CHUNK_BYTES,
        }
    }

    /// Records the difference between a segment's previous and new members: those who
    /// entered, then those who exited, each in profile id order. Fails with the pool's error
    /// when the sets that compare them, or the rows, do not fit in the memory limit.
    pub fn add(&mut self, segment: &str, before: &Members, after: &Members) -> Result<()> {
        let comparing = self.reservation.new_empty();
        before.reserve_sets(&comparing, 1)?;
        after.reserve_sets(&comparing, 1)?;
        let (was, is) = (before.set(), after.set());
        for (change, ids) in [
            ("entered", is.difference(&was)),
            ("exited", was.difference(&is)),
        ] {
            comparing.try_grow(ids.clone().count() * std::mem::size_of::<&str>())?;
            let mut ids: Vec<&str> = ids.copied().collect();
            ids.sort_unstable();
            for id in ids {
                self.segment.append_value(segment);
                self.profile.append_value(id);
                self.change.append_value(change);
                if self.change.len() >= CHUNK_ROWS
                    || self.segment.values_slice().len() + self.profile.values_slice().len()
                        >= self.chunk_bytes
                {
                    self.cut()?;
                }
            }
        }
        Ok(())
    }

    /// Finishes the rows being built into a batch of `segment_changes`.
    fn cut(&mut self) -> Result<()> {
        use arrow::array::{ArrayRef, StringArray, TimestampMicrosecondArray};
        let n = self.change.len();
        if n == 0 {
            return Ok(());
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.segment.finish()),
            Arc::new(self.profile.finish()),
            Arc::new(self.change.finish()),
            Arc::new(StringArray::from(vec![self.run_id.as_str(); n])),
            Arc::new(
                TimestampMicrosecondArray::from(vec![self.at.timestamp_micros(); n])
                    .with_timezone("UTC"),
            ),
        ];
        let batch = RecordBatch::try_new(Self::schema(), columns)?;
        self.reservation.try_grow(batch.get_array_memory_size())?;
        self.done.push(batch);
        Ok(())
    }

    fn schema() -> arrow::datatypes::SchemaRef {
        use arrow::datatypes::{Field, Schema};
        Arc::new(Schema::new(vec![
            Field::new("segment", DataType::Utf8, false),
            Field::new("profile_id", DataType::Utf8, false),
            Field::new("change", DataType::Utf8, false),
            Field::new("run_id", DataType::Utf8, false),
            Field::new("changed_at", crate::tables::timestamp_type(), false),
        ]))
    }

    /// How many rows.
    pub fn len(&self) -> usize {
        self.change.len() + self.done.iter().map(RecordBatch::num_rows).sum::<usize>()
    }

    /// True when no one entered or left any segment.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows as batches of `segment_changes` (one empty batch when there are none), with
    /// the pool's share they take: keep it until the batches are written. The rows are taken.
    pub fn take(&mut self) -> Result<(Vec<RecordBatch>, MemoryReservation)> {
        self.cut()?;
        let mut batches = std::mem::take(&mut self.done);
        if batches.is_empty() {
            batches.push(RecordBatch::new_empty(Self::schema()));
        }
        Ok((batches, self.reservation.take()))
    }
}

/// Runs one segment and registers it as `segments.<name>`; returns its members' rows and ids.
///
/// The rows stay in memory for later segments and reports, charged to the engine's memory
/// pool as `segments.<name>` while the table is registered: a segment larger than the memory
/// limit fails with the pool's error instead of growing past it.
pub async fn materialise(
    engine: &Engine,
    segment: &SegmentQuery,
) -> Result<(Vec<RecordBatch>, Members)> {
    let df = engine.query(&segment.sql, &segment.file).await?;
    materialise_rows(engine, segment, df).await
}

/// [`materialise`] for rows already planned: the segment's query or, in an incremental run,
/// its rows built from the touched profiles' (see [`crate::stages::incremental_segments`]).
pub async fn materialise_rows(
    engine: &Engine,
    segment: &SegmentQuery,
    df: datafusion::dataframe::DataFrame,
) -> Result<(Vec<RecordBatch>, Members)> {
    let schema = df.schema().as_arrow().clone();
    if schema.index_of("profile_id").is_err() {
        return Err(Error::query(&segment.file, "returns no `profile_id` column; a segment query returns one row per member with its profile_id"));
    }
    let df = crate::output::plain_columns(df)?;
    let held_as = format!("{}.{}", tables::SEGMENTS, segment.name);
    // The previous run's rows of this segment are no longer read.
    engine.release_memory(&held_as);
    // Through the engine, so that its plan is logged at debug level.
    let (batches, held) = engine
        .collect_reserved(
            df,
            &segment.file,
            format!("segment {} (rows held in memory)", segment.name),
        )
        .await?;
    let members = Members::of(&batches)?;
    // Ids that were not plain text (numbers, say) are a copy of their own.
    let copied = batches.iter().any(|b| {
        b.column_by_name("profile_id")
            .is_some_and(|c| c.data_type() != &DataType::Utf8)
    });
    if copied {
        held.try_grow(members.ids.iter().map(|a| a.get_array_memory_size()).sum())?;
    }
    if let Some(id) = members.repeated(&held)? {
        return Err(Error::query(&segment.file, format!("returns profile_id {id} more than once; a segment has one row per member (use DISTINCT or GROUP BY)")));
    }
    let mut batches = batches;
    if batches.is_empty() {
        batches.push(RecordBatch::new_empty(Arc::new(schema)));
    }
    let table = MemTable::try_new(batches[0].schema(), vec![batches.clone()])?;
    let reference = TableReference::partial(tables::SEGMENTS, segment.name.as_str());
    engine.ctx.deregister_table(reference.clone())?;
    engine.ctx.register_table(reference, Arc::new(table))?;
    engine.keep_reserved(&held_as, held);
    Ok((batches, members))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, StringArray};
    use datafusion::execution::memory_pool::{GreedyMemoryPool, UnboundedMemoryPool};

    fn members(parts: &[&[Option<&str>]]) -> Members {
        let batches: Vec<RecordBatch> = parts
            .iter()
            .map(|ids| {
                let ids: ArrayRef = Arc::new(StringArray::from(ids.to_vec()));
                RecordBatch::try_from_iter([("profile_id", ids)]).unwrap()
            })
            .collect();
        Members::of(&batches).unwrap()
    }

    fn unbounded() -> Arc<dyn MemoryPool> {
        Arc::new(UnboundedMemoryPool::default())
    }

    fn column(batches: &[RecordBatch], name: &str) -> Vec<String> {
        batches
            .iter()
            .flat_map(|b| {
                let c = b.column_by_name(name).unwrap().as_string::<i32>();
                c.iter().map(|v| v.unwrap().to_string()).collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn changes_list_who_entered_then_who_exited_each_in_id_order() {
        let before = members(&[&[Some("p3"), Some("p1")], &[Some("p2"), None]]);
        let after = members(&[&[Some("p5"), Some("p2")], &[], &[Some("p4"), Some("p3")]]);
        let at = chrono::DateTime::from_timestamp(0, 0).unwrap();
        let mut changes = Changes::new(&unbounded(), "run", at);
        changes.add("s", &before, &after).unwrap();
        changes
            .add("t", &Members::default(), &members(&[&[Some("p9")]]))
            .unwrap();
        changes.add("u", &after, &after).unwrap();
        let (batches, _held) = changes.take().unwrap();
        assert_eq!(column(&batches, "segment"), ["s", "s", "s", "t"]);
        assert_eq!(column(&batches, "profile_id"), ["p4", "p5", "p1", "p9"]);
        assert_eq!(
            column(&batches, "change"),
            ["entered", "entered", "exited", "entered"]
        );
        assert!(changes.is_empty(), "take takes the rows");
    }

    /// The batches are cut by the bytes of their ids, so no string column nears the 2 GiB an
    /// Arrow string array can address (a test with 2 GiB of ids would need that much memory:
    /// a small cut shows the same rule).
    #[test]
    fn changes_are_cut_into_batches_bounded_in_rows_and_bytes() {
        let at = chrono::DateTime::from_timestamp(0, 0).unwrap();
        let ids: Vec<String> = (0..CHUNK_ROWS + 10).map(|i| format!("p{i:07}")).collect();
        let after = members(&[&ids.iter().map(|s| Some(s.as_str())).collect::<Vec<_>>()]);
        let mut changes = Changes::new(&unbounded(), "run", at);
        changes.chunk_bytes = 1000;
        changes.add("seg", &Members::default(), &after).unwrap();
        let (batches, _held) = changes.take().unwrap();
        assert!(batches.len() > 1);
        for b in &batches {
            let bytes: usize = ["segment", "profile_id"]
                .iter()
                .map(|c| {
                    b.column_by_name(c)
                        .unwrap()
                        .as_string::<i32>()
                        .values()
                        .len()
                })
                .sum();
            assert!(bytes < 1000 + 20, "{bytes}");
        }
        let mut expected = ids.clone();
        expected.sort();
        assert_eq!(column(&batches, "profile_id"), expected);

        let mut changes = Changes::new(&unbounded(), "run", at);
        changes.add("seg", &Members::default(), &after).unwrap();
        let (batches, _held) = changes.take().unwrap();
        let rows: Vec<usize> = batches.iter().map(RecordBatch::num_rows).collect();
        assert_eq!(rows, [CHUNK_ROWS, 10]);
    }

    #[test]
    fn changes_and_member_sets_are_charged_to_the_pool_and_a_small_pool_refuses_them() {
        let at = chrono::DateTime::from_timestamp(0, 0).unwrap();
        let ids: Vec<String> = (0..100_000).map(|i| format!("p{i:07}")).collect();
        let after = members(&[&ids.iter().map(|s| Some(s.as_str())).collect::<Vec<_>>()]);
        let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(64 << 20));
        let mut changes = Changes::new(&pool, "run", at);
        changes.add("seg", &Members::default(), &after).unwrap();
        let (batches, held) = changes.take().unwrap();
        let size: usize = batches.iter().map(RecordBatch::get_array_memory_size).sum();
        assert_eq!(held.size(), size);
        assert_eq!(
            pool.reserved(),
            size,
            "the sets are given back after comparing"
        );
        drop(held);
        assert_eq!(pool.reserved(), 0);

        let small: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(1 << 20));
        let mut changes = Changes::new(&small, "run", at);
        let error = changes
            .add("seg", &Members::default(), &after)
            .unwrap_err()
            .to_string();
        assert!(error.contains("Resources exhausted"), "{error}");
        let checking = MemoryConsumer::new("check").register(&small);
        let error = after.repeated(&checking).unwrap_err().to_string();
        assert!(error.contains("Resources exhausted"), "{error}");
        drop(changes);
        assert_eq!(small.reserved(), 0);
    }

    #[test]
    fn a_repeated_member_is_found_across_batches_and_nulls_are_not_members() {
        let pool = unbounded();
        let checking = MemoryConsumer::new("check").register(&pool);
        assert_eq!(
            members(&[&[Some("a"), None], &[None, Some("b")]])
                .repeated(&checking)
                .unwrap(),
            None
        );
        assert_eq!(
            members(&[&[Some("a"), Some("b")], &[Some("c"), Some("a")]])
                .repeated(&checking)
                .unwrap(),
            Some("a")
        );
        assert_eq!(pool.reserved(), 0);
    }
}
