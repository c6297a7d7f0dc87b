//! Segments: `queries/segments/<name>.sql` → `segments.<name>` for later SQL and
//! `<output>/segments/<name>` for campaigns. Run order comes from the tables each query names.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::array::{Array, ArrayBuilder, AsArray, RecordBatch};
use arrow::datatypes::DataType;
use datafusion::catalog::MemorySchemaProvider;
use datafusion::common::TableReference;
use datafusion::datasource::MemTable;

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
/// millions of members, and a copy of each id in an ordered set cost seconds.
#[derive(Debug, Default)]
pub struct Members(Vec<arrow::array::StringArray>);

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
        Ok(Members(arrays))
    }

    /// Every member id (nulls skipped), in row order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.0.iter().flat_map(|a| a.iter().flatten())
    }

    /// An empty set with room for every id.
    fn empty_set(&self) -> foldhash::HashSet<&str> {
        let rows = self.0.iter().map(|a| a.len()).sum();
        foldhash::HashSet::with_capacity_and_hasher(rows, Default::default())
    }

    /// The ids as a set.
    fn set(&self) -> foldhash::HashSet<&str> {
        let mut set = self.empty_set();
        set.extend(self.ids());
        set
    }

    /// The first id that appears more than once.
    pub fn repeated(&self) -> Option<&str> {
        let mut seen = self.empty_set();
        self.ids().find(|id| !seen.insert(*id))
    }
}

/// The members of a segment's current published version (none before its first run).
pub async fn published_members(engine: &Engine, name: &str) -> Result<Members> {
    let table = format!("{}/{name}", tables::SEGMENTS);
    let Some(df) = engine.outputs.read(&engine.ctx, &table).await? else {
        return Ok(Members::default());
    };
    let df = df.select(vec![datafusion::logical_expr::col("profile_id")])?;
    Members::of(&df.collect().await?)
}

/// `segment_changes` rows: who entered and who left each segment since its last version.
#[derive(Debug, Default)]
pub struct Changes {
    segment: arrow::array::StringBuilder,
    profile: arrow::array::StringBuilder,
    change: arrow::array::StringBuilder,
}

impl Changes {
    /// Records the difference between a segment's previous and new members: those who
    /// entered, then those who exited, each in profile id order.
    pub fn add(&mut self, segment: &str, before: &Members, after: &Members) {
        let (was, is) = (before.set(), after.set());
        for (change, ids) in [
            ("entered", is.difference(&was)),
            ("exited", was.difference(&is)),
        ] {
            let mut ids: Vec<&str> = ids.copied().collect();
            ids.sort_unstable();
            for id in ids {
                self.segment.append_value(segment);
                self.profile.append_value(id);
                self.change.append_value(change);
            }
        }
    }

    /// How many rows.
    pub fn len(&self) -> usize {
        self.change.len()
    }

    /// True when no one entered or left any segment.
    pub fn is_empty(&self) -> bool {
        self.change.is_empty()
    }

    /// The rows as a batch of `segment_changes`; the rows are taken.
    pub fn to_batch(
        &mut self,
        run_id: &str,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<RecordBatch> {
        use arrow::array::{ArrayRef, StringArray, TimestampMicrosecondArray};
        use arrow::datatypes::{Field, Schema};
        let n = self.len();
        let schema = Schema::new(vec![
            Field::new("segment", DataType::Utf8, false),
            Field::new("profile_id", DataType::Utf8, false),
            Field::new("change", DataType::Utf8, false),
            Field::new("run_id", DataType::Utf8, false),
            Field::new("changed_at", crate::ingest::timestamp_type(), false),
        ]);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.segment.finish()),
            Arc::new(self.profile.finish()),
            Arc::new(self.change.finish()),
            Arc::new(StringArray::from(vec![run_id; n])),
            Arc::new(
                TimestampMicrosecondArray::from(vec![at.timestamp_micros(); n])
                    .with_timezone("UTC"),
            ),
        ];
        Ok(RecordBatch::try_new(Arc::new(schema), columns)?)
    }
}

/// Makes sure a schema of folder tables (`segments`, `reports`) exists in the context.
pub fn ensure_schema(engine: &Engine, schema: &str) -> Result<()> {
    let catalog = engine
        .ctx
        .catalog("datafusion")
        .ok_or_else(|| Error::Usage("the default catalog is missing".into()))?;
    if catalog.schema(schema).is_none() {
        catalog.register_schema(schema, Arc::new(MemorySchemaProvider::new()))?;
    }
    Ok(())
}

/// Runs one segment and registers it as `segments.<name>`; returns its members' rows and ids.
pub async fn materialise(
    engine: &Engine,
    segment: &SegmentQuery,
) -> Result<(Vec<RecordBatch>, Members)> {
    let df = engine.query(&segment.sql, &segment.file).await?;
    let schema = df.schema().as_arrow().clone();
    if schema.index_of("profile_id").is_err() {
        return Err(Error::query(&segment.file, "returns no `profile_id` column; a segment query returns one row per member with its profile_id"));
    }
    let df = crate::output::plain_columns(df)?;
    // Through the engine, so that its plan is logged at debug level.
    let batches = engine.collect(df, &segment.file).await?;
    let members = Members::of(&batches)?;
    if let Some(id) = members.repeated() {
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
    Ok((batches, members))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, StringArray};

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

    #[test]
    fn changes_list_who_entered_then_who_exited_each_in_id_order() {
        let before = members(&[&[Some("p3"), Some("p1")], &[Some("p2"), None]]);
        let after = members(&[&[Some("p5"), Some("p2")], &[], &[Some("p4"), Some("p3")]]);
        let mut changes = Changes::default();
        changes.add("s", &before, &after);
        changes.add("t", &Members::default(), &members(&[&[Some("p9")]]));
        changes.add("u", &after, &after);
        let at = chrono::DateTime::from_timestamp(0, 0).unwrap();
        let batch = changes.to_batch("run", at).unwrap();
        let column = |name: &str| -> Vec<String> {
            let c = batch.column_by_name(name).unwrap().as_string::<i32>();
            c.iter().map(|v| v.unwrap().to_string()).collect()
        };
        assert_eq!(column("segment"), ["s", "s", "s", "t"]);
        assert_eq!(column("profile_id"), ["p4", "p5", "p1", "p9"]);
        assert_eq!(
            column("change"),
            ["entered", "entered", "exited", "entered"]
        );
        assert!(changes.is_empty(), "to_batch takes the rows");
    }

    #[test]
    fn a_repeated_member_is_found_across_batches_and_nulls_are_not_members() {
        assert_eq!(
            members(&[&[Some("a"), None], &[None, Some("b")]]).repeated(),
            None
        );
        assert_eq!(
            members(&[&[Some("a"), Some("b")], &[Some("c"), Some("a")]]).repeated(),
            Some("a")
        );
    }
}
