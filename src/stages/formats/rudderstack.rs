//! RudderStack's object-storage data lake: `…/rudder-datalake/<namespace>/<table>/YYYY/MM/DD/HH/`
//! (or a `dt=2006-01-02` style time folder), one table per call type and one per track event.
//!
//! `tracks` holds every track call without its properties and each event's own table holds the
//! same calls with them, so only the event tables are read as track events (reading both would
//! give each event twice). `users` holds each user's latest traits, not events.

use arrow::datatypes::Schema;
use datafusion::logical_expr::Expr;

use super::flat::Flat;

/// Event-time columns, first non-NULL wins: `timestamp` is the event time corrected for the
/// device clock; `_timestamp` is the same value where a writer renamed the reserved word;
/// `original_timestamp` is the device's own clock; then when it was sent; then when RudderStack
/// received it.
pub(crate) const TIME_COLUMNS: &[&str] = &[
    "timestamp",
    "_timestamp",
    "original_timestamp",
    "sent_at",
    "received_at",
];

/// Anonymous-id columns, first non-NULL wins.
pub(crate) const ANONYMOUS_COLUMNS: &[&str] = &["anonymous_id", "context_traits_anonymous_id"];

const RESERVED: &[&str] = &[
    "id",
    "user_id",
    "received_at",
    "event",
    "event_text",
    "uuid_ts",
    "loaded_at",
    "channel",
];

/// `None` for the tables that hold no events of their own. `path` is the file's whole path, so a
/// location pointing at one table's folder still names it.
pub(crate) fn map(
    names: &[String],
    raw: &Schema,
) -> std::result::Result<Option<Vec<(String, Expr)>>, String> {
    let table = table_of(names).ok_or_else(|| {
        "cannot tell which RudderStack table holds this file: expected …/rudder-datalake/<namespace>/<table>/YYYY/MM/DD/HH/ or …/<table>/dt=YYYY-MM-DD/ below the configured location".to_string()
    })?;
    if matches!(table, "users" | "tracks") {
        return Ok(None);
    }
    let kind = super::call_type(table).unwrap_or("track");
    Flat {
        raw,
        kind,
        event_name: Some(table.to_string()),
        message_id: &["id"],
        anonymous_id: ANONYMOUS_COLUMNS,
        timestamp: TIME_COLUMNS,
        reserved: RESERVED,
        prefixed: false,
        producer: "RudderStack",
    }
    .map()
    .map(Some)
}

/// The table a file belongs to: the folder after `rudder-datalake/<namespace>/`, or else the
/// nearest folder above the file that is not a time folder (`2026`, `12`, `dt=2026-12-07`).
fn table_of(names: &[String]) -> Option<&str> {
    let folders = &names[..names.len().saturating_sub(1)];
    if let Some(i) = folders.iter().position(|n| n == "rudder-datalake") {
        return folders.get(i + 2).map(String::as_str);
    }
    folders
        .iter()
        .rev()
        .find(|n| !(n.chars().all(|c| c.is_ascii_digit()) || n.contains('=')))
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::table_of;

    fn names(path: &str) -> Vec<String> {
        path.split('/').map(str::to_string).collect()
    }

    #[test]
    fn finds_the_table_in_both_layouts() {
        assert_eq!(
            table_of(&names("rudder-datalake/web/pages/2026/12/07/05/a.parquet")),
            Some("pages")
        );
        assert_eq!(
            table_of(&names("order_completed/dt=2026-12-07/a.parquet")),
            Some("order_completed")
        );
        assert_eq!(
            table_of(&names("identifies/2026/12/07/05/a.parquet")),
            Some("identifies")
        );
        assert_eq!(table_of(&names("a.parquet")), None);
    }
}
