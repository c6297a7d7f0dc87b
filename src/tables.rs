//! Names of the tables and columns in Tessera's contract, and the types and id formats they
//! hold, in one place.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, TimeUnit};

/// The validated, deduplicated events table SQL sees.
pub const EVENTS: &str = "events";
/// Events that failed a row check, with the reason and their source file.
pub const REJECTED_EVENTS: &str = "rejected_events";
/// One row per run.
pub const RUNS: &str = "runs";

/// One row per identifier: its profile.
pub const IDENTITY_GRAPH: &str = "identity_graph";
/// One row per link that joined two identifiers.
pub const IDENTITY_LINKS: &str = "identity_links";
/// One row per refused link, with the reason.
pub const IDENTITY_CONFLICTS: &str = "identity_conflicts";
/// One row per profile merged into an older one.
pub const PROFILE_MERGES: &str = "profile_merges";
/// Probabilistic matching's trained parameters: (block, parameter, value).
pub const MATCH_MODEL: &str = "match_model";
/// One row per candidate pair above a block's reporting floor, with its weight per comparison.
pub const MATCH_SCORES: &str = "match_scores";

/// One row per profile.
pub const PROFILES: &str = "profiles";
/// Who entered and left each segment, run by run.
pub const SEGMENT_CHANGES: &str = "segment_changes";
/// The schema (and output folder) segments live in: `segments.<name>`.
pub const SEGMENTS: &str = "segments";

/// One row per visit: a profile's events without a gap longer than `[sessions] gap_minutes`.
pub const SESSIONS: &str = "sessions";
/// Recency, frequency and monetary value per buyer, with quintile scores and a named segment.
pub const RFM: &str = "rfm";
/// Per buyer: expected purchases, probability alive, churn risk, expected spend and lifetime value.
pub const PREDICTIONS: &str = "predictions";
/// The fitted models' parameters and diagnostics, in long form.
pub const PREDICTION_MODELS: &str = "prediction_models";
/// The schema (and output folder) of `queries/reports/<name>.sql` results: `reports.<name>`.
pub const REPORTS: &str = "reports";
/// The column of every report table holding the row's place in its query's `ORDER BY`.
pub const REPORT_ORDER: &str = "report_row";

/// Tessera's own state, kept under `<output>/_state/` and published with the run's tables.
pub mod state {
    /// One row per event file processed (URL, size, ETag, rows, run).
    pub const INPUT_FILES: &str = "_state/input_files";
    /// The event history: every event that passed the checks, one row per message_id.
    pub const EVENTS: &str = "_state/events";
    /// The trait files and the as-of the profiles were computed with.
    pub const TRAITS: &str = "_state/traits";
    /// Digests of forgotten people's identifiers, kept out of every later run.
    pub const SUPPRESSED: &str = "_state/suppressed";
    /// Per windowed trait or segment file and profile, the next moment its result can change
    /// only because time passed.
    pub const WINDOWS: &str = "_state/windows";
    /// The graph of the last published run: each node, its inputs and fingerprint.
    pub const NODES: &str = "_state/nodes";
    /// Each data test's inputs and failing rows at the last published run, so a run with
    /// nothing to recompute need not run a passing test again.
    pub const TESTS: &str = "_state/tests";
    /// Each probabilistic block's trained model, kept so later runs score with it.
    pub const MATCH_MODEL: &str = "_state/match_model";
    /// Each probabilistic block's records as digests, so a run knows which are new or changed.
    pub const MATCH_RECORDS: &str = "_state/match_records";
    /// Every identifier with its connected group, so a run resolves only the groups it reaches.
    pub const IDENTITY_IDS: &str = "_state/identity_ids";
    /// Every distinct candidate link and refused value, with its group.
    pub const IDENTITY_LINKS: &str = "_state/identity_links";
    /// The kept groups' fingerprint, the graph version they match and the next group number.
    pub const IDENTITY_GROUPS: &str = "_state/identity_groups";
}

/// One row per `tessera forget` request: digests of the identifiers, rows deleted per table.
pub const FORGET_REQUESTS: &str = "forget_requests";

/// Table names a `[[sources]]` entry may not take.
pub const RESERVED: &[&str] = &[
    EVENTS,
    REJECTED_EVENTS,
    RUNS,
    IDENTITY_GRAPH,
    IDENTITY_LINKS,
    IDENTITY_CONFLICTS,
    PROFILE_MERGES,
    MATCH_MODEL,
    MATCH_SCORES,
    PROFILES,
    SEGMENTS,
    SEGMENT_CHANGES,
    SESSIONS,
    RFM,
    PREDICTIONS,
    PREDICTION_MODELS,
    REPORTS,
    FORGET_REQUESTS,
];

/// Output tables that `tessera query` registers when they exist.
pub const OUTPUT_TABLES: &[&str] = &[
    REJECTED_EVENTS,
    IDENTITY_GRAPH,
    IDENTITY_LINKS,
    IDENTITY_CONFLICTS,
    PROFILE_MERGES,
    MATCH_MODEL,
    MATCH_SCORES,
    PROFILES,
    SEGMENT_CHANGES,
    SESSIONS,
    RFM,
    PREDICTIONS,
    PREDICTION_MODELS,
    RUNS,
    FORGET_REQUESTS,
];

/// Event columns (DESIGN.md §3).
pub mod event {
    /// Unique per event; duplicates are counted once.
    pub const MESSAGE_ID: &str = "message_id";
    /// The event's profile, added by identity resolution.
    pub const PROFILE_ID: &str = "profile_id";
    /// track, identify, page, screen, group or alias.
    pub const TYPE: &str = "type";
    /// When the event happened (UTC).
    pub const TIMESTAMP: &str = "timestamp";
    /// Device or cookie identifier.
    pub const ANONYMOUS_ID: &str = "anonymous_id";
    /// The customer's id in the client's own system.
    pub const USER_ID: &str = "user_id";
    /// The name of a track event.
    pub const EVENT: &str = "event";
    /// Identify traits (JSON text).
    pub const TRAITS: &str = "traits";
    /// Track/page properties (JSON text).
    pub const PROPERTIES: &str = "properties";
    /// Library, page, campaign… (JSON text).
    pub const CONTEXT: &str = "context";
    /// When the collector received the event (UTC).
    pub const RECEIVED_AT: &str = "received_at";

    /// The call types the Segment spec defines.
    pub const TYPES: &[&str] = &["track", "identify", "page", "screen", "group", "alias"];
    /// Columns holding JSON text, checked at ingest.
    pub const JSON_COLUMNS: &[&str] = &[TRAITS, PROPERTIES, CONTEXT];
}

/// Columns Tessera adds to its own tables.
pub mod column {
    /// Why a row went to `rejected_events`.
    pub const REASON: &str = "reason";
    /// The input file a rejected row came from.
    pub const SOURCE_FILE: &str = "source_file";
}

/// The timestamp type of every output timestamp: microseconds, UTC.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The type a column is stored as in Tessera's tables: no view types, timestamps in µs UTC.
pub fn plain_type(dt: &DataType) -> DataType {
    match dt {
        DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
        DataType::BinaryView | DataType::LargeBinary => DataType::Binary,
        DataType::Timestamp(_, _) => timestamp_type(),
        DataType::List(f)
        | DataType::LargeList(f)
        | DataType::ListView(f)
        | DataType::LargeListView(f) => DataType::List(Arc::new(plain_field(f))),
        DataType::Struct(fields) => {
            DataType::Struct(fields.iter().map(|f| plain_field(f)).collect())
        }
        DataType::Dictionary(_, value) => plain_type(value),
        other => other.clone(),
    }
}

/// `f` with [`plain_type`].
pub fn plain_field(f: &Field) -> Field {
    Field::new(f.name(), plain_type(f.data_type()), f.is_nullable())
}

/// Column `name` of a batch read back from a published table, as plain text (tables come back
/// with string views); `None` when the batch has no such column.
pub fn text_column(
    batch: &arrow::array::RecordBatch,
    name: &str,
) -> crate::error::Result<Option<arrow::array::StringArray>> {
    use arrow::array::AsArray;
    Ok(match batch.column_by_name(name) {
        Some(c) => Some(
            arrow::compute::cast(c, &DataType::Utf8)?
                .as_string::<i32>()
                .clone(),
        ),
        None => None,
    })
}

/// The text of profile id `number` as every table shows it: `p_` and 16 hex digits.
pub fn profile_id_text(number: u64) -> String {
    format!("p_{number:016x}")
}

/// The number of an id [`profile_id_text`] wrote; `None` for any other text.
pub fn profile_id_number(id: &str) -> Option<u64> {
    let hex = id.strip_prefix("p_")?;
    if hex.len() != 16 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}
