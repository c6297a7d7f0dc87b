//! `tessera validate`'s planning of every SQL file against the schemas a run would give it.
//!
//! Parsing alone lets a misspelt column or a read of a segment that does not exist through, to
//! fail hours later in a scheduled run. So each trait, segment, report and test file is planned
//! (not run) in the order a run would run it: traits against the events (with the
//! `profile_id` a run adds) and the published tables; `profiles` as published with the trait
//! files' columns as they are now; each segment and report against the schemas the files
//! before it plan to, registered as empty tables. A segment or report that no file defines any
//! more is not visible, as in a run.
//!
//! Each problem names the file, the line and the column (DataFusion's span when it has one,
//! else where the name first appears in the text), and the nearest known name.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::TableReference;

use crate::config::QueryFile;
use crate::engine::Engine;
use crate::error::Result;
use crate::tables;

/// What planning found: errors (the file cannot run) and notes (files it could not plan).
#[derive(Debug, Default)]
pub struct Planned {
    /// `file:line:column: message`, one per file at most.
    pub errors: Vec<String>,
    /// Files left unplanned, and why.
    pub notes: Vec<String>,
}

/// Built-in tables a run writes, which exist for planning only once a run published them.
const BUILT_IN: &[&str] = &[
    tables::IDENTITY_GRAPH,
    tables::IDENTITY_LINKS,
    tables::IDENTITY_CONFLICTS,
    tables::PROFILE_MERGES,
    tables::MATCH_MODEL,
    tables::MATCH_SCORES,
    tables::SESSIONS,
    tables::RFM,
    tables::PREDICTIONS,
    tables::PREDICTION_MODELS,
    tables::PROFILES,
    tables::RUNS,
    tables::SEGMENT_CHANGES,
    tables::REJECTED_EVENTS,
];

/// A SQL file in the run's order, with the name it registers under (if any).
struct Item {
    file: QueryFile,
    /// `segments/<name>` or `reports/<name>`; `None` for traits and tests.
    node: Option<(String, String)>,
}

/// Plans every trait, segment, report and data test of the project. `engine.ctx` must hold the
/// ingested `events` (as `validate` leaves them); the context's tables are changed.
pub async fn plan_all(engine: &Engine, tests: &[QueryFile]) -> Result<Planned> {
    let ctx = &engine.ctx;
    ctx.state_ref()
        .write()
        .config_mut()
        .options_mut()
        .sql_parser
        .collect_spans = true;
    let mut planned = Planned::default();

    // Events as later stages see them: with the profile each event belongs to.
    if let Ok(events) = ctx.table(tables::EVENTS).await {
        let mut fields: Vec<Field> = events
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        if !fields.iter().any(|f| f.name() == tables::event::PROFILE_ID) {
            fields.push(Field::new(tables::event::PROFILE_ID, DataType::Utf8, true));
        }
        register_empty(
            ctx,
            TableReference::bare(tables::EVENTS),
            Arc::new(Schema::new(fields)),
        )?;
    }
    engine.register_outputs().await?;
    // Only the project's own segments and reports are visible, as in a run.
    for folder in [tables::SEGMENTS, tables::REPORTS] {
        for name in engine.outputs.folder_tables(folder).await? {
            let _ = ctx.deregister_table(TableReference::partial(folder, name.as_str()));
        }
    }

    let traits = engine.project.query_files("traits")?;
    let mut trait_fields: Vec<Field> = Vec::new();
    for file in &traits {
        if let Some(schema) = plan_one(engine, file, &mut planned).await {
            trait_fields.extend(
                schema
                    .fields()
                    .iter()
                    .filter(|f| f.name() != tables::event::PROFILE_ID)
                    .map(|f| f.as_ref().clone()),
            );
        }
    }
    if let Ok(published) = ctx.table(tables::PROFILES).await {
        let mut fields: Vec<Field> = published
            .schema()
            .fields()
            .iter()
            .filter(|f| !trait_fields.iter().any(|t| t.name() == f.name()))
            .map(|f| f.as_ref().clone())
            .collect();
        fields.extend(trait_fields);
        register_empty(
            ctx,
            TableReference::bare(tables::PROFILES),
            Arc::new(Schema::new(fields)),
        )?;
    }

    let mut items = Vec::new();
    for folder in [tables::SEGMENTS, tables::REPORTS] {
        for file in engine.project.query_files(folder)? {
            let stem = file
                .path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            items.push(Item {
                file,
                node: Some((folder.to_string(), stem)),
            });
        }
    }
    let defined: BTreeMap<String, BTreeSet<String>> = [tables::SEGMENTS, tables::REPORTS]
        .iter()
        .map(|folder| {
            let names = items
                .iter()
                .filter_map(|i| i.node.as_ref())
                .filter(|(f, _)| f == folder)
                .map(|(_, n)| n.clone())
                .collect();
            (folder.to_string(), names)
        })
        .collect();
    items.extend(tests.iter().cloned().map(|file| Item { file, node: None }));

    // Each file after the segments and reports it reads; a file whose inputs never plan is
    // planned last and fails on them.
    let mut pending = items;
    let mut done: BTreeSet<(String, String)> = BTreeSet::new();
    let mut failed: BTreeSet<(String, String)> = BTreeSet::new();
    let mut unplanned: BTreeSet<(String, String)> = BTreeSet::new();
    while !pending.is_empty() {
        let ready = pending.iter().position(|item| {
            reads_of(engine, &item.file).iter().all(|r| {
                done.contains(r)
                    || failed.contains(r)
                    || unplanned.contains(r)
                    || !is_defined(&defined, r)
            })
        });
        let item = pending.remove(ready.unwrap_or(0));
        let reads = reads_of(engine, &item.file);
        if let Some(bad) = reads.iter().find(|r| failed.contains(*r)) {
            planned.notes.push(format!(
                "{}: not planned: it reads {}.{}, which has errors",
                item.file.file, bad.0, bad.1
            ));
            if let Some(node) = item.node {
                failed.insert(node);
            }
            continue;
        }
        if let Some(missing) = reads.iter().find(|r| !is_defined(&defined, r)) {
            let qualified = format!("{}.{}", missing.0, missing.1);
            let (line, column) = find(&item.file.sql, &qualified)
                .unwrap_or_else(|| locate(&item.file.sql, &missing.1));
            let known: Vec<String> = defined
                .get(&missing.0)
                .map(|n| n.iter().cloned().collect())
                .unwrap_or_default();
            planned.errors.push(format!(
                "{}:{line}:{column}: reads {}.{}, which no file in queries/{}/ defines{}",
                item.file.file,
                missing.0,
                missing.1,
                missing.0,
                did_you_mean(&missing.1, known.iter().map(String::as_str))
                    .map(|n| format!("; did you mean {}.{n}?", missing.0))
                    .unwrap_or_default()
            ));
            if let Some(node) = item.node {
                failed.insert(node);
            }
            continue;
        }
        let absent = match reads.iter().find(|r| unplanned.contains(*r)) {
            Some((folder, name)) => Some(format!("{folder}.{name}")),
            None => built_in_absent(engine, &item.file).await,
        };
        if let Some(absent) = absent {
            planned.notes.push(format!(
                "{}: not planned: it reads `{absent}`, whose schema is known only once a run has published it; validate plans it after the first run",
                item.file.file
            ));
            if let Some(node) = item.node {
                unplanned.insert(node);
            }
            continue;
        }
        match plan_one(engine, &item.file, &mut planned).await {
            Some(schema) => {
                if let Some((folder, name)) = item.node {
                    engine.ensure_schema(&folder)?;
                    register_empty(
                        ctx,
                        TableReference::partial(folder.as_str(), name.as_str()),
                        schema,
                    )?;
                    done.insert((folder, name));
                }
            }
            None => {
                if let Some(node) = item.node {
                    failed.insert(node);
                }
            }
        }
    }
    Ok(planned)
}

fn is_defined(defined: &BTreeMap<String, BTreeSet<String>>, read: &(String, String)) -> bool {
    defined
        .get(&read.0)
        .is_some_and(|names| names.contains(&read.1))
}

/// The segments and reports `file` reads, as (folder, name).
fn reads_of(engine: &Engine, file: &QueryFile) -> Vec<(String, String)> {
    let Ok(statement) = crate::engine::check_read_only(&engine.ctx, &file.sql, &file.file) else {
        return Vec::new();
    };
    let Ok(references) = engine.ctx.state().resolve_table_references(&statement) else {
        return Vec::new();
    };
    references
        .iter()
        .filter_map(|r| {
            let schema = r.schema()?;
            (schema == tables::SEGMENTS || schema == tables::REPORTS)
                .then(|| (schema.to_string(), r.table().to_string()))
        })
        .collect()
}

/// A built-in table `file` reads that is not there to plan against (no run published it).
async fn built_in_absent(engine: &Engine, file: &QueryFile) -> Option<String> {
    let statement = crate::engine::check_read_only(&engine.ctx, &file.sql, &file.file).ok()?;
    let references = engine
        .ctx
        .state()
        .resolve_table_references(&statement)
        .ok()?;
    for reference in references {
        if reference.schema().is_some() {
            continue;
        }
        let table = reference.table();
        if BUILT_IN.contains(&table) && !engine.ctx.table_exist(table).unwrap_or(false) {
            return Some(table.to_string());
        }
    }
    None
}

/// Plans `file`; its result's schema, or `None` with the error pushed.
async fn plan_one(engine: &Engine, file: &QueryFile, planned: &mut Planned) -> Option<SchemaRef> {
    if let Err(e) = crate::engine::check_read_only(&engine.ctx, &file.sql, &file.file) {
        planned.errors.push(e.to_string());
        return None;
    }
    match engine
        .ctx
        .sql_with_options(&file.sql, crate::engine::read_only())
        .await
    {
        Ok(df) => Some(Arc::new(df.schema().as_arrow().clone())),
        Err(e) => {
            planned.errors.push(located(engine, file, &e));
            None
        }
    }
}

/// `file:line:column: message` for a planning error, with the nearest name when it is a table.
fn located(engine: &Engine, file: &QueryFile, e: &datafusion::error::DataFusionError) -> String {
    let diagnostic = e.iter().find_map(|e| e.diagnostic());
    let root = e.find_root();
    let mut message = diagnostic
        .map(|d| d.message.clone())
        .unwrap_or_else(|| root.to_string());
    // The root's text holds DataFusion's own "Did you mean" for columns.
    let root_text = root.to_string();
    if !message.contains("Did you mean") {
        if let Some(i) = root_text.find("Did you mean") {
            let hint = &root_text[i..];
            let hint = hint.find('?').map_or(hint, |end| &hint[..=end]);
            message.push_str(&format!(". {hint}"));
        }
    }
    let span = diagnostic.and_then(|d| d.span).filter(|s| s.start.line > 0);
    let (line, column) = match span {
        Some(span) => (span.start.line as usize, span.start.column as usize),
        None => match missing_table(&root_text) {
            Some(table) => {
                let short = table.rsplit('.').next().unwrap_or(&table).to_string();
                if let Some(near) =
                    did_you_mean(&short, known_tables(engine).iter().map(String::as_str))
                {
                    message.push_str(&format!("; did you mean {near}?"));
                }
                locate(&file.sql, &short)
            }
            None => (1, 1),
        },
    };
    for help in diagnostic.iter().flat_map(|d| d.helps.iter()) {
        message.push_str(&format!("; {}", help.message));
    }
    format!("{}:{line}:{column}: {message}", file.file)
}

/// The table named in DataFusion's "table '…' not found".
fn missing_table(text: &str) -> Option<String> {
    if !text.contains("not found") {
        return None;
    }
    let start = text.find("table '")? + "table '".len();
    let end = text[start..].find('\'')?;
    Some(text[start..start + end].to_string())
}

/// Every table name the planning context knows, as SQL would name it.
fn known_tables(engine: &Engine) -> Vec<String> {
    let mut names = Vec::new();
    let Some(catalog) = engine.ctx.catalog("datafusion") else {
        return names;
    };
    for schema in catalog.schema_names() {
        if let Some(provider) = catalog.schema(&schema) {
            for table in provider.table_names() {
                if schema == "public" {
                    names.push(table);
                } else {
                    names.push(format!("{schema}.{table}"));
                }
            }
        }
    }
    names
}

/// The candidate nearest `name`, if it is near enough to be a likely misspelling.
pub fn did_you_mean<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<String> {
    let name = name.to_lowercase();
    candidates
        .map(|c| {
            let short = c.rsplit('.').next().unwrap_or(c).to_lowercase();
            (strsim::jaro_winkler(&name, &short), c)
        })
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.to_string())
}

/// Line and column (1-based) where `word` first appears in `sql` as a whole word, outside
/// `--` comments; (1, 1) when it does not.
pub fn locate(sql: &str, word: &str) -> (usize, usize) {
    find(sql, word).unwrap_or((1, 1))
}

fn find(sql: &str, word: &str) -> Option<(usize, usize)> {
    let word = word.to_lowercase();
    for (n, line) in sql.lines().enumerate() {
        let code = line.split("--").next().unwrap_or("").to_lowercase();
        let mut from = 0;
        while let Some(i) = code[from..].find(&word) {
            let at = from + i;
            let before = code[..at].chars().last();
            let after = code[at + word.len()..].chars().next();
            let boundary = |c: Option<char>| !c.is_some_and(|c| c.is_alphanumeric() || c == '_');
            if boundary(before) && boundary(after) {
                return Some((n + 1, code[..at].chars().count() + 1));
            }
            from = at + word.len();
        }
    }
    None
}

fn register_empty(
    ctx: &datafusion::prelude::SessionContext,
    reference: TableReference,
    schema: SchemaRef,
) -> Result<()> {
    let table = datafusion::datasource::MemTable::try_new(schema, vec![vec![]])?;
    let _ = ctx.deregister_table(reference.clone());
    ctx.register_table(reference, Arc::new(table))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_located_outside_comments_and_inside_words_only_whole() {
        let sql = "-- high value: revenue\nSELECT profile_id, revenue_total\nFROM profiles WHERE revenue > 1";
        assert_eq!(locate(sql, "revenue"), (3, 21));
        assert_eq!(locate(sql, "revenue_total"), (2, 20));
        assert_eq!(locate(sql, "nowhere"), (1, 1));
    }

    #[test]
    fn the_nearest_name_is_suggested_only_when_near() {
        let names = ["high_value", "active_30d", "lapsed_buyers"];
        assert_eq!(
            did_you_mean("high_valeu", names.iter().copied()),
            Some("high_value".into())
        );
        assert_eq!(did_you_mean("zzz", names.iter().copied()), None);
    }

    #[test]
    fn the_missing_table_is_read_from_the_message() {
        assert_eq!(
            missing_table("Error during planning: table 'datafusion.segments.nope' not found"),
            Some("datafusion.segments.nope".into())
        );
        assert_eq!(missing_table("Schema error: No field named x"), None);
    }
}
