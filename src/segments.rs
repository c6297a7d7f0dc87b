//! Segments: `queries/segments/<name>.sql` → `segments.<name>` for later SQL and
//! `<output>/segments/<name>` for campaigns. Run order comes from the tables each query names.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
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

/// The members of a segment's current published version (empty before its first run).
pub async fn published_members(engine: &Engine, name: &str) -> Result<BTreeSet<String>> {
    let table = format!("{}/{name}", tables::SEGMENTS);
    let mut members = BTreeSet::new();
    let Some(df) = engine.outputs.read(&engine.ctx, &table).await? else {
        return Ok(members);
    };
    let df = df.select(vec![datafusion::logical_expr::cast(
        datafusion::logical_expr::col("profile_id"),
        DataType::Utf8,
    )])?;
    for b in df.collect().await? {
        members.extend(
            b.column(0)
                .as_string::<i32>()
                .iter()
                .flatten()
                .map(str::to_string),
        );
    }
    Ok(members)
}

/// Profile ids in a segment's new members.
pub fn member_ids(batches: &[RecordBatch]) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for b in batches {
        let ids = arrow::compute::cast(
            b.column(b.schema().index_of("profile_id")?),
            &DataType::Utf8,
        )?;
        out.extend(ids.as_string::<i32>().iter().flatten().map(str::to_string));
    }
    Ok(out)
}

/// `segment_changes` rows: who entered and who left each segment since its last version.
#[derive(Debug, Default)]
pub struct Changes {
    segment: Vec<String>,
    profile: Vec<String>,
    change: Vec<&'static str>,
}

impl Changes {
    /// Records the difference between a segment's previous and new members.
    pub fn add(&mut self, segment: &str, before: &BTreeSet<String>, after: &BTreeSet<String>) {
        for p in after.difference(before) {
            self.push(segment, p, "entered");
        }
        for p in before.difference(after) {
            self.push(segment, p, "exited");
        }
    }

    fn push(&mut self, segment: &str, profile: &str, change: &'static str) {
        self.segment.push(segment.to_string());
        self.profile.push(profile.to_string());
        self.change.push(change);
    }

    /// How many rows.
    pub fn len(&self) -> usize {
        self.change.len()
    }

    /// True when no one entered or left any segment.
    pub fn is_empty(&self) -> bool {
        self.change.is_empty()
    }

    /// The rows as a batch of `segment_changes`.
    pub fn to_batch(&self, run_id: &str, at: chrono::DateTime<chrono::Utc>) -> Result<RecordBatch> {
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
            Arc::new(StringArray::from(self.segment.clone())),
            Arc::new(StringArray::from(self.profile.clone())),
            Arc::new(StringArray::from(self.change.clone())),
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

/// Runs one segment and registers it as `segments.<name>`; returns its members' rows.
pub async fn materialise(engine: &Engine, segment: &SegmentQuery) -> Result<Vec<RecordBatch>> {
    let df = engine.query(&segment.sql, &segment.file).await?;
    let schema = df.schema().as_arrow().clone();
    let Ok(key) = schema.index_of("profile_id") else {
        return Err(Error::query(&segment.file, "returns no `profile_id` column; a segment query returns one row per member with its profile_id"));
    };
    let df = crate::output::plain_columns(df)?;
    // Through the engine, so that its plan is logged at debug level.
    let batches = engine.collect(df, &segment.file).await?;
    let mut seen = std::collections::HashSet::new();
    for b in &batches {
        let ids = arrow::compute::cast(b.column(key), &DataType::Utf8)?;
        for id in ids.as_string::<i32>().iter().flatten() {
            if !seen.insert(id.to_string()) {
                return Err(Error::query(&segment.file, format!("returns profile_id {id} more than once; a segment has one row per member (use DISTINCT or GROUP BY)")));
            }
        }
    }
    let mut batches = batches;
    if batches.is_empty() {
        batches.push(RecordBatch::new_empty(Arc::new(schema)));
    }
    let table = MemTable::try_new(batches[0].schema(), vec![batches.clone()])?;
    let reference = TableReference::partial(tables::SEGMENTS, segment.name.as_str());
    engine.ctx.deregister_table(reference.clone())?;
    engine.ctx.register_table(reference, Arc::new(table))?;
    Ok(batches)
}
