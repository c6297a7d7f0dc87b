//! The run as a graph of nodes: one per output table (or group of tables one piece of code
//! writes together), each knowing what it reads and what its result depends on.
//!
//! A node's fingerprint is made of:
//! - its code: the SQL file's text, or for a built-in node Tessera's version;
//! - the config keys it uses, each with its value;
//! - the fingerprints of the nodes it reads (so a change flows downstream);
//! - for a time-dependent node, the as-of time. A SQL node is time-dependent when its text
//!   calls `as_of()`, `now()`, `current_date`, `current_time`, `current_timestamp`,
//!   `localtime`, `localtimestamp` or `today()`; of the built-in nodes, `rfm` and
//!   `predictions` are (recency and age are measured to the as-of);
//! - for the event history, the event files added; for a `[[sources]]` table an SQL file
//!   reads, a digest of the source's file listing (names, sizes, ETags).
//!
//! Each run records every node in `_state/nodes`, published with its tables. The next run
//! (and `tessera plan`) compares: a node whose parts all match is kept, its published tables
//! carried into the new `runs` row as they are; any difference recomputes it, and the
//! [`Step`] says which. A node that no longer exists (its file deleted, or a built-in table
//! nothing needs any more) is retired.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::QueryFile;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::tables;

/// Where the graph of the last published run is kept.
pub const STATE: &str = tables::state::NODES;

/// The names of the built-in nodes (SQL nodes are `traits/<name>`, `segments/<name>`,
/// `reports/<name>`).
pub mod node {
    /// The event history.
    pub const EVENTS: &str = "events";
    /// Identity resolution.
    pub const IDENTITY: &str = "identity";
    /// Sessions.
    pub const SESSIONS: &str = "sessions";
    /// RFM scores.
    pub const RFM: &str = "rfm";
    /// Predictions and their models.
    pub const PREDICTIONS: &str = "predictions";
    /// Profiles.
    pub const PROFILES: &str = "profiles";
}

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The event history (`_state/events`), `rejected_events` and `_state/input_files`.
    Events,
    /// `identity_graph`, `identity_links`, `identity_conflicts`, `profile_merges`.
    Identity,
    /// `sessions`.
    Sessions,
    /// `rfm`.
    Rfm,
    /// `predictions` and `prediction_models`.
    Predictions,
    /// One trait file: a part of `profiles`.
    Trait,
    /// `profiles`: identifiers, last-known traits and every trait file's columns.
    Profiles,
    /// `segments.<name>` (and its rows of `segment_changes`).
    Segment,
    /// `reports.<name>`.
    Report,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Events => "events",
            Kind::Identity => "identity",
            Kind::Sessions => "sessions",
            Kind::Rfm => "rfm",
            Kind::Predictions => "predictions",
            Kind::Trait => "trait",
            Kind::Profiles => "profiles",
            Kind::Segment => "segment",
            Kind::Report => "report",
        }
    }
}

/// One node of the run.
#[derive(Debug, Clone)]
pub struct Node {
    /// `events`, `identity`, `sessions`, `rfm`, `predictions`, `traits/<name>`, `profiles`,
    /// `segments/<name>`, `reports/<name>`.
    pub name: String,
    /// What it is.
    pub kind: Kind,
    /// The SQL file it runs, relative to the project.
    pub file: Option<String>,
    /// The output tables it writes.
    pub tables: Vec<String>,
    /// The nodes it reads.
    pub reads: BTreeSet<String>,
    /// Digest of its code: the SQL text, or Tessera's version for built-in nodes.
    pub code: String,
    /// The config keys it uses, with their values (JSON text).
    pub config: BTreeMap<String, String>,
    /// Whether its result depends on the as-of time.
    pub time_dependent: bool,
    /// Whether it reads `runs` (which every run that writes anything changes).
    pub reads_runs: bool,
    /// Digest of each `[[sources]]` table it reads.
    pub sources: BTreeMap<String, String>,
}

/// A built-in table that is not computed, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// The node.
    pub node: String,
    /// Why nothing needs it.
    pub reason: String,
}

/// The project's nodes, each after the nodes it reads.
#[derive(Debug, Clone)]
pub struct Graph {
    /// In an order where each node comes after what it reads.
    pub nodes: Vec<Node>,
    /// Built-in tables not computed.
    pub skipped: Vec<Skipped>,
}

/// Functions and keywords whose value depends on when a query runs.
const TIME_WORDS: &[&str] = &[
    "as_of",
    "now",
    "current_date",
    "current_time",
    "current_timestamp",
    "localtime",
    "localtimestamp",
    "today",
];

/// Every word of `sql`, lowercased (`None` when it does not tokenize; its stage reports that).
fn words(sql: &str, dialect: &str) -> Option<BTreeSet<String>> {
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    let dialect = datafusion::sql::sqlparser::dialect::dialect_from_str(dialect)
        .unwrap_or_else(|| Box::new(datafusion::sql::sqlparser::dialect::GenericDialect {}));
    let tokens = Tokenizer::new(dialect.as_ref(), sql).tokenize().ok()?;
    Some(
        tokens
            .into_iter()
            .filter_map(|t| match t {
                Token::Word(w) if w.quote_style.is_none() => Some(w.value.to_lowercase()),
                _ => None,
            })
            .collect(),
    )
}

/// Whether `sql` calls a function whose value depends on the time of the run.
pub fn is_time_dependent(sql: &str, dialect: &str) -> bool {
    match words(sql, dialect) {
        Some(words) => TIME_WORDS.iter().any(|w| words.contains(*w)),
        // Cannot tell: treat it as time-dependent, which only costs a recomputation.
        None => true,
    }
}

/// The SQL dialect the engine parses with.
fn dialect(engine: &Engine) -> String {
    engine
        .ctx
        .state()
        .config()
        .options()
        .sql_parser
        .dialect
        .to_string()
}

/// What decides the rows of a data test besides the output tables: its SQL, Tessera's
/// version, the files of each `[[sources]]` table it reads and, when it reads the clock,
/// the as-of. `None` when its reads cannot be worked out, or when it reads `runs` (a failed
/// run appends to it without publishing anything): such a test is always run. `listed`
/// holds the sources' digests already listed, so tests reading one source list it once.
pub async fn test_inputs(
    engine: &Engine,
    name: &str,
    sql: &str,
    as_of: DateTime<Utc>,
    listed: &mut BTreeMap<String, String>,
) -> Result<Option<String>> {
    let file = QueryFile {
        file: name.to_string(),
        sql: sql.to_string(),
        path: Default::default(),
    };
    let Ok(reads) = reads_of(engine, &file) else {
        return Ok(None);
    };
    if reads.runs {
        return Ok(None);
    }
    let mut text = sql_code(&file);
    for (source, digest) in source_digests(engine, &reads.sources, listed).await? {
        text.push_str(&format!("\u{0}{source}={digest}"));
    }
    if is_time_dependent(sql, &dialect(engine)) {
        text.push_str(&format!("\u{0}as_of={}", as_of.timestamp_micros()));
    }
    Ok(Some(digest(&text)))
}

fn digest(text: &str) -> String {
    crate::digest::sha256_hex(text)
}

/// The code digest of a built-in node: Tessera's version, so an upgrade recomputes it.
fn built_in_code(name: &str) -> String {
    digest(&format!("{name}\u{0}{}", env!("CARGO_PKG_VERSION")))
}

/// The code digest of a SQL file (Tessera's version included: it may plan a function
/// differently).
fn sql_code(file: &QueryFile) -> String {
    digest(&format!(
        "{}\u{0}{}\u{0}{}",
        env!("CARGO_PKG_VERSION"),
        file.file,
        file.sql
    ))
}

/// `value` flattened into `prefix.key[i].key = JSON` entries.
fn flatten(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                flatten(&format!("{prefix}.{k}"), v, out);
            }
        }
        serde_json::Value::Array(items) if items.iter().any(|i| i.is_object()) => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

fn section<T: Serialize>(name: &str, value: &T) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Ok(value) = serde_json::to_value(value) {
        flatten(name, &value, &mut out);
    }
    out
}

/// What one SQL file reads, as node names; `sources` gets the `[[sources]]` tables it names.
struct Reads {
    nodes: BTreeSet<String>,
    sources: BTreeSet<String>,
    runs: bool,
    segment_changes: bool,
}

fn reads_of(engine: &Engine, file: &QueryFile) -> Result<Reads> {
    let statement = crate::engine::check_read_only(&engine.ctx, &file.sql, &file.file)?;
    let references = engine
        .ctx
        .state()
        .resolve_table_references(&statement)
        .map_err(|e| Error::query(&file.file, e))?;
    let source_names: BTreeSet<&str> = engine
        .project
        .config
        .sources
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    let mut reads = Reads {
        nodes: BTreeSet::new(),
        sources: BTreeSet::new(),
        runs: false,
        segment_changes: false,
    };
    for reference in references {
        let table = reference.table().to_string();
        match reference.schema() {
            Some(schema) if schema == tables::SEGMENTS => {
                reads.nodes.insert(format!("{}/{table}", tables::SEGMENTS));
            }
            Some(schema) if schema == tables::REPORTS => {
                reads.nodes.insert(format!("{}/{table}", tables::REPORTS));
            }
            _ => match table.as_str() {
                tables::EVENTS => {
                    reads.nodes.insert(node::EVENTS.into());
                    reads.nodes.insert(node::IDENTITY.into());
                }
                tables::REJECTED_EVENTS => {
                    reads.nodes.insert(node::EVENTS.into());
                }
                tables::IDENTITY_GRAPH
                | tables::IDENTITY_LINKS
                | tables::IDENTITY_CONFLICTS
                | tables::PROFILE_MERGES
                | tables::MATCH_MODEL
                | tables::MATCH_SCORES => {
                    reads.nodes.insert(node::IDENTITY.into());
                }
                tables::SESSIONS => {
                    reads.nodes.insert(node::SESSIONS.into());
                }
                tables::RFM => {
                    reads.nodes.insert(node::RFM.into());
                }
                tables::PREDICTIONS | tables::PREDICTION_MODELS => {
                    reads.nodes.insert(node::PREDICTIONS.into());
                }
                tables::PROFILES => {
                    reads.nodes.insert(node::PROFILES.into());
                }
                tables::RUNS => reads.runs = true,
                tables::SEGMENT_CHANGES => reads.segment_changes = true,
                name if source_names.contains(name) => {
                    reads.sources.insert(name.to_string());
                }
                _ => {}
            },
        }
    }
    Ok(reads)
}

/// A digest of the files of `[[sources]]` table `name`: names, sizes and ETags (or times).
async fn source_digest(engine: &Engine, name: &str) -> Result<String> {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    let Some((i, source)) = engine
        .project
        .config
        .sources
        .iter()
        .enumerate()
        .find(|(_, s)| s.name == name)
    else {
        return Ok(String::new());
    };
    let key = format!("sources[{i}].location");
    let place = crate::storage::Place::open_with(
        &source.location,
        &engine.project.dir,
        &key,
        &engine.project.config.storage.retry,
    )?;
    let mut listing: Vec<String> = Vec::new();
    let single = source.location.trim_end().ends_with(".parquet")
        || (source.format == crate::config::SourceFormat::Csv
            && place.store.head(&place.prefix).await.is_ok());
    let metas: Vec<object_store::ObjectMeta> = if single {
        match place.store.head(&place.prefix).await {
            Ok(meta) => vec![meta],
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(e.into()),
        }
    } else {
        match place.store.list(Some(&place.prefix)).try_collect().await {
            Ok(found) => found,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(e.into()),
        }
    };
    for meta in metas {
        listing.push(format!(
            "{}\u{0}{}\u{0}{}",
            meta.location,
            meta.size,
            meta.e_tag
                .clone()
                .unwrap_or_else(|| meta.last_modified.to_rfc3339())
        ));
    }
    listing.sort();
    Ok(digest(&format!(
        "{}\u{0}{}",
        source.location,
        listing.join("\n")
    )))
}

/// The digests of the sources `names`, each listed at most once per graph (`listed`).
async fn source_digests(
    engine: &Engine,
    names: &BTreeSet<String>,
    listed: &mut BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for name in names {
        if !listed.contains_key(name) {
            listed.insert(name.clone(), source_digest(engine, name).await?);
        }
        out.insert(name.clone(), listed[name].clone());
    }
    Ok(out)
}

impl Graph {
    /// The project's graph: its SQL files and the built-in nodes they or the config need.
    pub async fn build(engine: &Engine) -> Result<Graph> {
        let project = &engine.project;
        let config = &project.config;
        let dialect = dialect(engine);
        let mut nodes: Vec<Node> = Vec::new();
        // Each source's files are listed once, however many nodes read it.
        let mut listed: BTreeMap<String, String> = BTreeMap::new();

        // The event history.
        nodes.push(Node {
            name: node::EVENTS.into(),
            kind: Kind::Events,
            file: None,
            tables: vec![
                tables::state::EVENTS.into(),
                tables::REJECTED_EVENTS.into(),
                tables::state::INPUT_FILES.into(),
            ],
            reads: BTreeSet::new(),
            code: built_in_code(node::EVENTS),
            config: events_config(config),
            time_dependent: false,
            reads_runs: false,
            sources: BTreeMap::new(),
        });

        // Identity: its SQL files, the [identity] section and the sources they read.
        let identity_files = project.query_files("identity")?;
        let mut identity_sources = BTreeSet::new();
        let mut identity_code = String::from(env!("CARGO_PKG_VERSION"));
        for file in &identity_files {
            let reads = reads_of(engine, file)?;
            identity_sources.extend(reads.sources);
            identity_code.push('\u{0}');
            identity_code.push_str(&sql_code(file));
        }
        // Probabilistic blocks' record sources are the identity node's inputs too.
        for block in &config.identity.probabilistic {
            if let Some(source) = &block.source {
                identity_sources.insert(source.clone());
            }
        }
        let mut identity_tables = vec![
            tables::IDENTITY_GRAPH.to_string(),
            tables::IDENTITY_LINKS.into(),
            tables::IDENTITY_CONFLICTS.into(),
            tables::PROFILE_MERGES.into(),
            // Written when identity can resolve by groups (see identity::groups).
            tables::state::IDENTITY_IDS.into(),
            tables::state::IDENTITY_LINKS.into(),
            tables::state::IDENTITY_GROUPS.into(),
        ];
        if !config.identity.probabilistic.is_empty() {
            identity_tables.extend([
                tables::MATCH_MODEL.into(),
                tables::MATCH_SCORES.into(),
                tables::state::MATCH_MODEL.into(),
                tables::state::MATCH_RECORDS.into(),
            ]);
        }
        let mut identity_config = section("identity", &config.identity);
        for (i, source) in config.sources.iter().enumerate() {
            if identity_sources.contains(&source.name) {
                identity_config.extend(section(&format!("sources[{i}]"), source));
            }
        }
        let sources = source_digests(engine, &identity_sources, &mut listed).await?;
        nodes.push(Node {
            name: node::IDENTITY.into(),
            kind: Kind::Identity,
            file: None,
            tables: identity_tables,
            reads: BTreeSet::from([node::EVENTS.to_string()]),
            code: digest(&identity_code),
            config: identity_config,
            time_dependent: false,
            reads_runs: false,
            sources,
        });

        // The SQL nodes, read first: they decide which built-in tables are needed.
        struct SqlNode {
            name: String,
            kind: Kind,
            file: QueryFile,
            reads: Reads,
        }
        let mut sql_nodes: Vec<SqlNode> = Vec::new();
        for (kind, folder) in [
            (Kind::Trait, "traits"),
            (Kind::Segment, tables::SEGMENTS),
            (Kind::Report, tables::REPORTS),
        ] {
            for file in project.query_files(folder)? {
                let stem = file
                    .path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default()
                    .to_string();
                let reads = reads_of(engine, &file)?;
                sql_nodes.push(SqlNode {
                    name: format!("{folder}/{stem}"),
                    kind,
                    file,
                    reads,
                });
            }
        }
        let read_anywhere: BTreeSet<&str> = sql_nodes
            .iter()
            .flat_map(|n| n.reads.nodes.iter().map(String::as_str))
            .collect();
        let mut skipped = Vec::new();
        let built_in = |name: &str, section_name: &str| -> Option<String> {
            if config.declared.contains(section_name) || read_anywhere.contains(name) {
                None
            } else {
                Some(format!(
                    "not computed: tessera.toml has no [{section_name}] section and no query reads `{name}`"
                ))
            }
        };
        let events_and_identity =
            BTreeSet::from([node::EVENTS.to_string(), node::IDENTITY.to_string()]);
        for (name, kind, section_name, tables_written, time_dependent, keys) in [
            (
                node::SESSIONS,
                Kind::Sessions,
                "sessions",
                vec![tables::SESSIONS.to_string()],
                false,
                section("sessions", &config.sessions),
            ),
            (
                node::RFM,
                Kind::Rfm,
                "predictions",
                vec![tables::RFM.to_string()],
                true,
                section("predictions", &config.predictions),
            ),
            (
                node::PREDICTIONS,
                Kind::Predictions,
                "predictions",
                vec![
                    tables::PREDICTIONS.to_string(),
                    tables::PREDICTION_MODELS.to_string(),
                ],
                true,
                section("predictions", &config.predictions),
            ),
        ] {
            if let Some(reason) = built_in(name, section_name) {
                skipped.push(Skipped {
                    node: name.into(),
                    reason,
                });
                continue;
            }
            nodes.push(Node {
                name: name.into(),
                kind,
                file: None,
                tables: tables_written,
                reads: events_and_identity.clone(),
                code: built_in_code(name),
                config: keys,
                time_dependent,
                reads_runs: false,
                sources: BTreeMap::new(),
            });
        }

        // Trait files, then profiles, which holds their columns.
        let mut trait_names = BTreeSet::new();
        let mut rest = Vec::new();
        for node in sql_nodes {
            if node.kind != Kind::Trait {
                rest.push(node);
                continue;
            }
            let sources = source_digests(engine, &node.reads.sources, &mut listed).await?;
            trait_names.insert(node.name.clone());
            nodes.push(Node {
                time_dependent: is_time_dependent(&node.file.sql, &dialect),
                name: node.name,
                kind: Kind::Trait,
                tables: Vec::new(),
                reads: node.reads.nodes,
                code: sql_code(&node.file),
                config: BTreeMap::new(),
                reads_runs: node.reads.runs,
                sources,
                file: Some(node.file.file),
            });
        }
        let mut profile_reads = events_and_identity.clone();
        profile_reads.extend(trait_names);
        nodes.push(Node {
            name: node::PROFILES.into(),
            kind: Kind::Profiles,
            file: None,
            tables: vec![tables::PROFILES.into(), tables::state::TRAITS.into()],
            reads: profile_reads,
            code: built_in_code("profiles"),
            config: section("profiles", &config.profiles),
            time_dependent: false,
            reads_runs: false,
            sources: BTreeMap::new(),
        });

        // Segments and reports, each after what it reads.
        let segment_names: BTreeSet<String> = rest
            .iter()
            .filter(|n| n.kind == Kind::Segment)
            .map(|n| n.name.clone())
            .collect();
        let mut pending: Vec<Node> = Vec::new();
        for node in rest {
            let sources = source_digests(engine, &node.reads.sources, &mut listed).await?;
            let mut reads = node.reads.nodes;
            if node.reads.segment_changes {
                reads.extend(segment_names.iter().cloned());
            }
            let table = node.name.clone();
            pending.push(Node {
                time_dependent: is_time_dependent(&node.file.sql, &dialect),
                tables: vec![table],
                name: node.name,
                kind: node.kind,
                reads,
                code: sql_code(&node.file),
                config: BTreeMap::new(),
                reads_runs: node.reads.runs,
                sources,
                file: Some(node.file.file),
            });
        }
        // Segments before reports (a report may read every segment); within each, an order
        // where every node comes after the nodes of its kind it reads. A cycle, or a read of a
        // segment that does not exist, is left for the stage to report with its file.
        pending.sort_by_key(|n| n.kind);
        let mut placed: BTreeSet<String> = nodes.iter().map(|n| n.name.clone()).collect();
        while !pending.is_empty() {
            let ready = pending.iter().position(|n| {
                n.reads
                    .iter()
                    .all(|r| placed.contains(r) || !pending.iter().any(|p| &p.name == r))
            });
            let node = pending.remove(ready.unwrap_or(0));
            placed.insert(node.name.clone());
            nodes.push(node);
        }
        Ok(Graph { nodes, skipped })
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// What a run does with a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Computed again; its tables get a new version.
    Recompute,
    /// Unchanged; its published tables are carried over as they are.
    Keep,
    /// Gone from the project; its tables leave the published set.
    Retire,
}

/// One node's fate in a run, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// The node.
    pub node: String,
    /// What it is.
    pub kind: Kind,
    /// Its SQL file, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// What the run does with it.
    pub action: Action,
    /// Why (empty when kept).
    pub reasons: Vec<String>,
    /// The tables it writes.
    pub tables: Vec<String>,
    /// For a recomputed trait or segment, as `tessera plan` works it out: whether it runs
    /// over the touched profiles only or over every profile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub over: Option<String>,
}

impl Step {
    /// Whether the node is recomputed only because the event history or identity was: its
    /// own file, config keys and as-of are as published (see
    /// [`crate::stages::incremental_segments`]).
    pub fn only_new_events(&self) -> bool {
        self.action == Action::Recompute
            && !self.reasons.is_empty()
            && self.reasons.iter().all(|r| {
                *r == format!("upstream `{}` recomputed", node::EVENTS)
                    || *r == format!("upstream `{}` recomputed", node::IDENTITY)
            })
    }

    /// Whether the node is recomputed because its as-of moved, and otherwise only because the
    /// event history or identity was (see [`crate::stages::windows`]).
    pub fn only_new_events_and_time(&self) -> bool {
        let moved = |r: &String| r.starts_with("as-of moved");
        self.action == Action::Recompute
            && self.reasons.iter().any(moved)
            && self.reasons.iter().all(|r| {
                moved(r)
                    || *r == format!("upstream `{}` recomputed", node::EVENTS)
                    || *r == format!("upstream `{}` recomputed", node::IDENTITY)
            })
    }
}

/// What a run will do: every node's step, in run order, then the retired nodes.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The steps.
    pub steps: Vec<Step>,
    /// Built-in tables not computed, and why.
    pub skipped: Vec<Skipped>,
    /// The as-of time of the run.
    pub as_of: DateTime<Utc>,
    /// Event files the run would read.
    pub new_files: usize,
}

impl Plan {
    /// The step of node `name`.
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.node == name)
    }

    /// Whether node `name` is recomputed.
    pub fn recomputes(&self, name: &str) -> bool {
        self.step(name)
            .is_some_and(|s| s.action == Action::Recompute)
    }

    /// Whether the run has anything to do.
    pub fn has_work(&self) -> bool {
        self.steps.iter().any(|s| s.action != Action::Keep)
    }

    /// The nodes recomputed, in run order.
    pub fn recomputed(&self) -> Vec<&Step> {
        self.steps
            .iter()
            .filter(|s| s.action == Action::Recompute)
            .collect()
    }

    /// The plan as text: one line per node recomputed or retired, then counts.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "as of {}; {} new event file{}",
            self.as_of
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            self.new_files,
            if self.new_files == 1 { "" } else { "s" }
        );
        let mut kept = 0;
        for step in &self.steps {
            let verb = match step.action {
                Action::Keep => {
                    kept += 1;
                    continue;
                }
                Action::Recompute => "recompute",
                Action::Retire => "retire",
            };
            let over = step
                .over
                .as_ref()
                .map(|o| format!(" [over {o}]"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {verb:<9} {}: {}{over}",
                step.node,
                step.reasons.join("; ")
            );
        }
        if kept > 0 {
            let _ = writeln!(
                out,
                "  kept      {kept} node{} unchanged",
                if kept == 1 { "" } else { "s" }
            );
        }
        for skipped in &self.skipped {
            let _ = writeln!(out, "  skipped   {}: {}", skipped.node, skipped.reason);
        }
        if !self.has_work() {
            let _ = writeln!(out, "nothing to recompute: the next run writes nothing");
        }
        out
    }
}

/// What the last published run recorded about one node.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// What it was.
    pub kind: String,
    /// Its SQL file.
    pub file: Option<String>,
    /// Its tables.
    pub tables: Vec<String>,
    /// The nodes it read.
    pub reads: BTreeSet<String>,
    /// Its code digest.
    pub code: String,
    /// Its config keys and values.
    pub config: BTreeMap<String, String>,
    /// The as-of it was computed at, if time-dependent.
    pub as_of: Option<i64>,
    /// Its sources' digests.
    pub sources: BTreeMap<String, String>,
    /// Its fingerprint.
    pub fingerprint: String,
}

/// The graph the last published run recorded, by node name; `None` before any run recorded
/// one.
pub async fn recorded(engine: &Engine) -> Result<Option<BTreeMap<String, Recorded>>> {
    let Some(df) = engine.outputs.read(&engine.ctx, STATE).await? else {
        return Ok(None);
    };
    let mut out = BTreeMap::new();
    for batch in df.collect().await? {
        let text = |name: &str| -> Result<StringArray> {
            let column = batch.column_by_name(name).ok_or_else(|| {
                Error::Usage(format!(
                    "{STATE} has no `{name}` column; run `tessera run --full` to rebuild it"
                ))
            })?;
            Ok(arrow::compute::cast(column, &DataType::Utf8)?
                .as_string::<i32>()
                .clone())
        };
        let (node, kind, file, tables_json, reads, code, config, sources, fingerprint) = (
            text("node")?,
            text("kind")?,
            text("file")?,
            text("tables")?,
            text("reads")?,
            text("code")?,
            text("config")?,
            text("sources")?,
            text("fingerprint")?,
        );
        let as_of = batch
            .column_by_name("as_of")
            .map(|c| arrow::compute::cast(c, &DataType::Int64))
            .transpose()?;
        let json_list = |v: &str| serde_json::from_str::<Vec<String>>(v).unwrap_or_default();
        let json_map =
            |v: &str| serde_json::from_str::<BTreeMap<String, String>>(v).unwrap_or_default();
        for row in 0..batch.num_rows() {
            out.insert(
                node.value(row).to_string(),
                Recorded {
                    kind: kind.value(row).to_string(),
                    file: (!file.is_null(row)).then(|| file.value(row).to_string()),
                    tables: json_list(tables_json.value(row)),
                    reads: json_list(reads.value(row)).into_iter().collect(),
                    code: code.value(row).to_string(),
                    config: json_map(config.value(row)),
                    as_of: as_of.as_ref().and_then(|a| {
                        let a = a.as_primitive::<arrow::datatypes::Int64Type>();
                        (!a.is_null(row)).then(|| a.value(row))
                    }),
                    sources: json_map(sources.value(row)),
                    fingerprint: fingerprint.value(row).to_string(),
                },
            );
        }
    }
    Ok(Some(out))
}

fn short_time(micros: i64) -> String {
    DateTime::<Utc>::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| micros.to_string())
}

fn shorten(value: &str) -> String {
    if value.chars().count() > 40 {
        format!("{}…", value.chars().take(40).collect::<String>())
    } else {
        value.to_string()
    }
}

/// What a run would do, given the last recorded graph, the event files it would read, its
/// as-of time and whether `--full` was asked for.
pub fn plan(
    graph: &Graph,
    recorded: Option<&BTreeMap<String, Recorded>>,
    new_files: usize,
    as_of: DateTime<Utc>,
    full: bool,
) -> (Plan, BTreeMap<String, String>) {
    let as_of_micros = as_of.timestamp_micros();
    let mut steps: Vec<Step> = Vec::new();
    let mut fingerprints: BTreeMap<String, String> = BTreeMap::new();
    let mut recomputed: BTreeSet<String> = BTreeSet::new();
    for pass in 0..2 {
        steps.clear();
        fingerprints.clear();
        // The second pass runs only when the first recomputes something: a node that reads
        // `runs` then sees the run's own row.
        let runs_changes = pass == 1;
        recomputed.clear();
        for node in &graph.nodes {
            let before = recorded.and_then(|r| r.get(&node.name));
            let mut reasons: Vec<String> = Vec::new();
            match before {
                _ if full => reasons.push("--full rebuilds every node".into()),
                _ if recorded.is_none() && node.kind != Kind::Events => {
                    reasons.push("no earlier run recorded the graph".into())
                }
                None => reasons.push(match (&node.file, recorded) {
                    (_, None) => "no earlier run recorded the graph".to_string(),
                    (Some(file), _) => format!("new file {file}"),
                    (None, _) => format!("`{}` is needed now", node.name),
                }),
                Some(before) => {
                    if before.code != node.code {
                        reasons.push(match &node.file {
                            Some(file) => format!("{file} changed"),
                            None => format!(
                                "Tessera's built-in code changed (now version {})",
                                env!("CARGO_PKG_VERSION")
                            ),
                        });
                    }
                    let keys: BTreeSet<&String> =
                        node.config.keys().chain(before.config.keys()).collect();
                    for key in keys {
                        let (now, then) = (node.config.get(key), before.config.get(key));
                        if now != then {
                            reasons.push(format!(
                                "config key {key} changed ({} → {})",
                                then.map(|v| shorten(v)).unwrap_or_else(|| "unset".into()),
                                now.map(|v| shorten(v)).unwrap_or_else(|| "unset".into())
                            ));
                        }
                    }
                    if node.time_dependent && before.as_of != Some(as_of_micros) {
                        reasons.push(format!(
                            "as-of moved ({} → {})",
                            before
                                .as_of
                                .map(short_time)
                                .unwrap_or_else(|| "not time-dependent before".into()),
                            short_time(as_of_micros)
                        ));
                    }
                    for (source, print) in &node.sources {
                        if before.sources.get(source) != Some(print) {
                            reasons.push(format!("source `{source}` changed"));
                        }
                    }
                    for gone in before.reads.difference(&node.reads) {
                        if gone.contains('/') {
                            reasons.push(format!("no longer reads `{gone}`"));
                        }
                    }
                }
            }
            if node.kind == Kind::Events && new_files > 0 {
                reasons.push(format!(
                    "{new_files} new event file{}",
                    if new_files == 1 { "" } else { "s" }
                ));
            }
            let own = !reasons.is_empty() && (full || recorded.is_none());
            for read in &node.reads {
                if recomputed.contains(read) && !own {
                    reasons.push(format!("upstream `{read}` recomputed"));
                }
            }
            if node.reads_runs && runs_changes && !own {
                reasons.push("reads `runs`, which this run appends to".into());
            }
            // The event history has nothing to recompute without new files: a first run of
            // the graph over an existing history keeps it.
            if node.kind == Kind::Events
                && !full
                && new_files == 0
                && before.is_none()
                && recorded.is_some()
            {
                reasons.clear();
            }
            let mut print = format!("{}\u{0}{}", node.name, node.code);
            for (k, v) in &node.config {
                print.push_str(&format!("\u{0}{k}={v}"));
            }
            for read in &node.reads {
                print.push_str(&format!(
                    "\u{0}<{read}:{}",
                    fingerprints.get(read).map(String::as_str).unwrap_or("")
                ));
            }
            for (k, v) in &node.sources {
                print.push_str(&format!("\u{0}source {k}={v}"));
            }
            if node.time_dependent {
                print.push_str(&format!("\u{0}as_of={as_of_micros}"));
            }
            if node.kind == Kind::Events && !reasons.is_empty() {
                // A new version of the history: the new files (or a rebuild) on top of the
                // last recorded version.
                print.push_str(&format!(
                    "\u{0}after {}\u{0}{new_files}\u{0}{as_of_micros}",
                    before.map(|b| b.fingerprint.as_str()).unwrap_or("")
                ));
            }
            let fingerprint = if reasons.is_empty() {
                before
                    .map(|b| b.fingerprint.clone())
                    .unwrap_or_else(|| digest(&print))
            } else {
                digest(&print)
            };
            fingerprints.insert(node.name.clone(), fingerprint);
            let action = if reasons.is_empty() {
                Action::Keep
            } else {
                recomputed.insert(node.name.clone());
                Action::Recompute
            };
            steps.push(Step {
                node: node.name.clone(),
                kind: node.kind,
                file: node.file.clone(),
                action,
                reasons,
                tables: node.tables.clone(),
                over: None,
            });
        }
        if let Some(recorded) = recorded {
            for (name, before) in recorded {
                if graph.node(name).is_some() {
                    continue;
                }
                let reason = match &before.file {
                    Some(file) => format!("{file} was removed"),
                    None => graph
                        .skipped
                        .iter()
                        .find(|s| &s.node == name)
                        .map(|s| s.reason.clone())
                        .unwrap_or_else(|| "no longer part of the project".into()),
                };
                steps.push(Step {
                    node: name.clone(),
                    kind: match before.kind.as_str() {
                        "segment" => Kind::Segment,
                        "report" => Kind::Report,
                        "trait" => Kind::Trait,
                        "sessions" => Kind::Sessions,
                        "rfm" => Kind::Rfm,
                        "predictions" => Kind::Predictions,
                        "identity" => Kind::Identity,
                        "profiles" => Kind::Profiles,
                        _ => Kind::Events,
                    },
                    file: before.file.clone(),
                    action: Action::Retire,
                    reasons: vec![reason],
                    tables: before.tables.clone(),
                    over: None,
                });
            }
        }
        let work = steps.iter().any(|s| s.action != Action::Keep);
        let reads_runs = graph.nodes.iter().any(|n| n.reads_runs);
        if pass == 0 && !(work && reads_runs) {
            break;
        }
    }
    (
        Plan {
            steps,
            skipped: graph.skipped.clone(),
            as_of,
            new_files,
        },
        fingerprints,
    )
}

/// `_state/nodes` for `graph` as this run leaves it.
pub fn state_batch(
    graph: &Graph,
    fingerprints: &BTreeMap<String, String>,
    as_of: DateTime<Utc>,
) -> Result<RecordBatch> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("node", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("file", DataType::Utf8, true),
        Field::new("tables", DataType::Utf8, false),
        Field::new("reads", DataType::Utf8, false),
        Field::new("code", DataType::Utf8, false),
        Field::new("config", DataType::Utf8, false),
        Field::new("time_dependent", DataType::Boolean, false),
        Field::new("as_of", tables::timestamp_type(), true),
        Field::new("sources", DataType::Utf8, false),
        Field::new("fingerprint", DataType::Utf8, false),
    ]));
    let nodes = &graph.nodes;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(nodes.iter().map(|n| &n.name))),
        Arc::new(StringArray::from_iter_values(
            nodes.iter().map(|n| n.kind.as_str()),
        )),
        Arc::new(StringArray::from_iter(
            nodes.iter().map(|n| n.file.as_deref()),
        )),
        Arc::new(StringArray::from_iter_values(
            nodes.iter().map(|n| json(&n.tables)),
        )),
        Arc::new(StringArray::from_iter_values(
            nodes.iter().map(|n| json(&n.reads)),
        )),
        Arc::new(StringArray::from_iter_values(nodes.iter().map(|n| &n.code))),
        Arc::new(StringArray::from_iter_values(
            nodes.iter().map(|n| json(&n.config)),
        )),
        Arc::new(BooleanArray::from_iter(
            nodes.iter().map(|n| Some(n.time_dependent)),
        )),
        Arc::new(
            arrow::array::TimestampMicrosecondArray::from_iter(
                nodes
                    .iter()
                    .map(|n| n.time_dependent.then(|| as_of.timestamp_micros())),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(StringArray::from_iter_values(
            nodes.iter().map(|n| json(&n.sources)),
        )),
        Arc::new(StringArray::from_iter_values(
            nodes
                .iter()
                .map(|n| fingerprints.get(&n.name).cloned().unwrap_or_default()),
        )),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// `value` as JSON text (a list or map of strings cannot fail to serialise).
fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

/// What the event history is read from: `storage.events`, and (only when set, so a project's
/// digests stay as they were without them) its format and the sources with an event format.
fn events_config(config: &crate::config::Config) -> BTreeMap<String, String> {
    let text = |v: &str| serde_json::Value::String(v.to_string()).to_string();
    let mut out = BTreeMap::from([("storage.events".to_string(), text(&config.storage.events))]);
    if config.storage.events_format != crate::config::EventFormat::Segment {
        out.insert(
            "storage.events_format".into(),
            text(config.storage.events_format.name()),
        );
    }
    for (i, source) in config.sources.iter().enumerate() {
        if let Some(format) = source.format.events() {
            out.insert(
                format!("sources[{i}]"),
                text(&format!("{} {}", format.name(), source.location)),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_dependence_is_read_from_the_words_of_the_sql() {
        let d = "generic";
        assert!(is_time_dependent(
            "SELECT profile_id FROM events WHERE timestamp > as_of() - INTERVAL '30 days'",
            d
        ));
        assert!(is_time_dependent("SELECT now()", d));
        assert!(is_time_dependent("SELECT CURRENT_DATE", d));
        assert!(!is_time_dependent(
            "SELECT profile_id, count(*) AS n FROM events GROUP BY profile_id",
            d
        ));
        // A column or string that merely contains the word is not a call.
        assert!(!is_time_dependent(
            "SELECT \"now\", 'as_of' AS label, as_of_date FROM profiles",
            d
        ));
    }

    fn sql_node(name: &str, reads: &[&str], time_dependent: bool) -> Node {
        Node {
            name: name.into(),
            kind: Kind::Segment,
            file: Some(format!("queries/{name}.sql")),
            tables: vec![name.into()],
            reads: reads.iter().map(|r| r.to_string()).collect(),
            code: digest(name),
            config: BTreeMap::new(),
            time_dependent,
            reads_runs: false,
            sources: BTreeMap::new(),
        }
    }

    fn recorded_from(
        graph: &Graph,
        prints: &BTreeMap<String, String>,
        as_of: DateTime<Utc>,
    ) -> BTreeMap<String, Recorded> {
        graph
            .nodes
            .iter()
            .map(|n| {
                (
                    n.name.clone(),
                    Recorded {
                        kind: n.kind.as_str().into(),
                        file: n.file.clone(),
                        tables: n.tables.clone(),
                        reads: n.reads.clone(),
                        code: n.code.clone(),
                        config: n.config.clone(),
                        as_of: n.time_dependent.then(|| as_of.timestamp_micros()),
                        sources: n.sources.clone(),
                        fingerprint: prints[&n.name].clone(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_plan_recomputes_what_changed_and_what_reads_it_and_keeps_the_rest() {
        let mut identity = sql_node("identity", &[], false);
        identity.kind = Kind::Identity;
        identity.file = None;
        identity
            .config
            .insert("identity.identifiers[0].limit".into(), "3".into());
        let graph = Graph {
            nodes: vec![
                identity,
                sql_node("segments/a", &["identity"], false),
                sql_node("segments/b", &["segments/a"], false),
                sql_node("segments/window", &[], true),
                sql_node("segments/gone", &[], false),
            ],
            skipped: Vec::new(),
        };
        let t0 = DateTime::<Utc>::from_timestamp(1_790_000_000, 0).unwrap();
        let (first, prints) = plan(&graph, None, 0, t0, false);
        assert!(first.steps.iter().all(|s| s.action == Action::Recompute));
        let recorded = recorded_from(&graph, &prints, t0);

        // Nothing changed: every node kept, the same fingerprints.
        let (same, same_prints) = plan(&graph, Some(&recorded), 0, t0, false);
        assert!(!same.has_work(), "{}", same.render());
        assert_eq!(same_prints, prints);

        // A config key of identity, a moved as-of and a removed file.
        let mut changed = graph.clone();
        changed.nodes[0]
            .config
            .insert("identity.identifiers[0].limit".into(), "1".into());
        changed.nodes.retain(|n| n.name != "segments/gone");
        let t1 = t0 + chrono::Duration::days(1);
        let (next, next_prints) = plan(&changed, Some(&recorded), 0, t1, false);
        let action = |name: &str| next.step(name).map(|s| s.action);
        assert_eq!(action("identity"), Some(Action::Recompute));
        assert!(next.step("identity").unwrap().reasons[0]
            .contains("identity.identifiers[0].limit changed (3 → 1)"));
        assert_eq!(action("segments/a"), Some(Action::Recompute));
        assert_eq!(
            action("segments/b"),
            Some(Action::Recompute),
            "two levels down"
        );
        assert_eq!(action("segments/window"), Some(Action::Recompute));
        assert!(next.step("segments/window").unwrap().reasons[0].starts_with("as-of moved"));
        assert_eq!(action("segments/gone"), Some(Action::Retire));
        assert_ne!(next_prints["segments/b"], prints["segments/b"]);

        // --full recomputes every node, each for that one reason.
        let (full, _) = plan(&graph, Some(&recorded), 0, t0, true);
        assert!(full
            .steps
            .iter()
            .all(|s| s.action == Action::Recompute && s.reasons.len() == 1));
    }

    #[test]
    fn config_sections_flatten_into_keys() {
        let mut out = BTreeMap::new();
        flatten(
            "identity",
            &serde_json::json!({"identifiers": [{"name": "email", "limit": 3}], "default_country_code": "1"}),
            &mut out,
        );
        assert_eq!(out.get("identity.identifiers[0].limit").unwrap(), "3");
        assert_eq!(out.get("identity.default_country_code").unwrap(), "\"1\"");
    }
}
