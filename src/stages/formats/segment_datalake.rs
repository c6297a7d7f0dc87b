//! Segment Data Lakes: `…/<source_id>/segment_type=<type or event>/day=YYYY-MM-DD/hr=HH/`
//! Parquet, one table per call type and one per track event (there is no `tracks` table), with
//! properties, traits and context flattened into `_`-joined columns.

use arrow::datatypes::Schema;
use datafusion::logical_expr::Expr;

use super::flat::Flat;

/// Event-time columns, first non-NULL wins.
pub(crate) const TIME_COLUMNS: &[&str] =
    &["timestamp", "original_timestamp", "sent_at", "received_at"];

const RESERVED: &[&str] = &[
    "type",
    "user_id",
    "received_at",
    "event",
    "event_text",
    "uuid_ts",
    "loaded_at",
    "channel",
    "segment_type",
    "day",
    "hr",
];

pub(crate) fn map(
    raw: &Schema,
    partitions: &[(String, String)],
) -> std::result::Result<Option<Vec<(String, Expr)>>, String> {
    let segment_type = partitions
        .iter()
        .find(|(k, _)| k == "segment_type")
        .map(|(_, v)| v.as_str())
        .ok_or_else(|| {
            "no `segment_type=` folder above this file: Segment Data Lakes lands …/<source_id>/segment_type=<event>/day=YYYY-MM-DD/hr=HH/; point the location at the source's folder".to_string()
        })?;
    let kind = super::call_type(segment_type).unwrap_or("track");
    Flat {
        raw,
        kind,
        event_name: Some(segment_type.to_string()),
        message_id: &["message_id", "id"],
        anonymous_id: &["anonymous_id"],
        timestamp: TIME_COLUMNS,
        reserved: RESERVED,
        prefixed: true,
        producer: "Segment Data Lakes",
    }
    .map()
    .map(Some)
}
