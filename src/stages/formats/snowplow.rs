//! The Snowplow lake loader's Delta table: one wide table of the canonical event model,
//! partitioned by `load_tstamp_date` and `event_name`, with each self-describing event as an
//! `unstruct_event_<vendor>_<name>_<major>` struct column and each entity as a
//! `contexts_<vendor>_<name>_<major>` column holding a list of structs.
//!
//! Its live files come from the Delta log, not from listing the folder: compaction and deletes
//! leave files on disk that the table no longer holds.

use arrow::datatypes::{DataType, Schema};
use datafusion::logical_expr::{lit, when, Expr};
use object_store::path::Path as ObjectPath;

use super::{
    col, first_of, json_object, json_text_udf, json_writable, null_text, null_time, text, time,
    EventColumns, Json,
};
use crate::error::{Error, Result};
use crate::storage::Place;

/// Event-time columns, first non-NULL wins: the tracker's best estimate of when the event
/// happened, then when the collector received it, then the device's clock.
pub(crate) const TIME_COLUMNS: &[&str] =
    &["derived_tstamp", "collector_tstamp", "dvce_created_tstamp"];

/// Anonymous-id columns, first non-NULL wins: the first-party cookie id, then the collector's
/// third-party cookie id.
pub(crate) const ANONYMOUS_COLUMNS: &[&str] = &["domain_userid", "network_userid"];

/// Identifier columns kept on `events` under their own names, for identity queries.
pub(crate) const IDENTIFIER_COLUMNS: &[&str] =
    &["domain_userid", "network_userid", "domain_sessionid"];

/// Page fields Segment's page calls carry as properties.
const PAGE_PROPERTIES: &[(&str, &str)] = &[
    ("url", "page_url"),
    ("title", "page_title"),
    ("referrer", "page_referrer"),
    ("path", "page_urlpath"),
];

/// Structured-event fields, as properties.
const STRUCT_PROPERTIES: &[(&str, &str)] = &[
    ("category", "se_category"),
    ("action", "se_action"),
    ("label", "se_label"),
    ("property", "se_property"),
    ("value", "se_value"),
];

pub(crate) fn map(
    raw: &Schema,
    partitions: &[(String, String)],
) -> std::result::Result<Option<Vec<(String, Expr)>>, String> {
    let message_id = text(raw, "event_id", "the event id")?.ok_or_else(|| {
        "no `event_id` column; every Snowplow event has one. Is `format` right for this location?"
            .to_string()
    })?;
    let event_name = match text(raw, "event_name", "the event name")? {
        Some(e) => e,
        None => match partitions.iter().find(|(k, _)| k == "event_name") {
            Some((_, v)) => lit(v.as_str()),
            None => {
                return Err(
                    "no `event_name`, neither as a column nor as the table's partition value"
                        .into(),
                )
            }
        },
    };
    let mut times = Vec::new();
    for name in TIME_COLUMNS {
        times.extend(time(raw, name, "the event time")?);
    }
    if times.is_empty() {
        return Err(format!(
            "no time column: it needs one of `{}`",
            TIME_COLUMNS.join("`, `")
        ));
    }
    let mut anonymous = Vec::new();
    for name in ANONYMOUS_COLUMNS {
        anonymous.extend(text(raw, name, "a cookie id")?);
    }
    let mut extra = Vec::new();
    for name in IDENTIFIER_COLUMNS {
        if let Some(e) = text(raw, name, "an identifier")? {
            extra.push((name.to_string(), e));
        }
    }
    let is_page = event_name.clone().eq(lit("page_view"));
    let present = |pairs: &[(&str, &str)]| -> Vec<(String, Json)> {
        pairs
            .iter()
            .filter(|(_, column)| raw.field_with_name(column).is_ok())
            .map(|(key, column)| (key.to_string(), Json::Value(col(column))))
            .collect()
    };
    let mut unstruct: Vec<Expr> = raw
        .fields()
        .iter()
        .filter(|f| {
            f.name().starts_with("unstruct_event_")
                && matches!(f.data_type(), DataType::Struct(_))
                && json_writable(f.data_type())
        })
        .map(|f| json_text_udf().call(vec![col(f.name())]))
        .collect();
    unstruct.push(json_object(present(STRUCT_PROPERTIES)));
    let properties = when(is_page.clone(), json_object(present(PAGE_PROPERTIES)))
        .otherwise(first_of(unstruct, null_text()))
        .map_err(|e| e.to_string())?;

    // `load_tstamp` is the loader's bookkeeping, not part of the event.
    let used: Vec<&str> = ["event_id", "event_name", "user_id", "load_tstamp"]
        .into_iter()
        .chain(TIME_COLUMNS.iter().copied())
        .chain(IDENTIFIER_COLUMNS.iter().copied())
        .chain(PAGE_PROPERTIES.iter().map(|(_, c)| *c))
        .chain(STRUCT_PROPERTIES.iter().map(|(_, c)| *c))
        .collect();
    let mut context: Vec<(String, Json)> =
        vec![("page".to_string(), Json::Object(present(PAGE_PROPERTIES)))];
    context.extend(
        raw.fields()
            .iter()
            .filter(|f| {
                !used.contains(&f.name().as_str())
                    && !f.name().starts_with("unstruct_event_")
                    && json_writable(f.data_type())
            })
            .map(|f| (f.name().clone(), Json::Value(col(f.name())))),
    );

    let columns = EventColumns {
        message_id,
        kind: when(is_page.clone(), lit("page"))
            .otherwise(lit("track"))
            .map_err(|e| e.to_string())?,
        event: when(is_page, null_text())
            .otherwise(event_name)
            .map_err(|e| e.to_string())?,
        anonymous_id: first_of(anonymous, null_text()),
        user_id: text(raw, "user_id", "the user id")?.unwrap_or_else(null_text),
        timestamp: first_of(times, null_time()),
        received_at: time(raw, "collector_tstamp", "when the collector received it")?
            .unwrap_or_else(null_time),
        traits: null_text(),
        properties,
        context: json_object(context),
        extra,
    };
    Ok(Some(columns.into_columns()))
}

/// One live file of a Delta table.
pub struct DeltaFile {
    /// Its path inside the store.
    pub path: ObjectPath,
    /// Its path's parts below the table's folder.
    pub names: Vec<String>,
    /// Its partition values, from the log.
    pub partitions: Vec<(String, String)>,
}

/// The files the Delta table at `place` holds now, as its log says.
pub async fn list_delta_files(place: &Place) -> Result<Vec<DeltaFile>> {
    let fail = |message: String| Error::Location {
        key: place.key.clone(),
        location: place.url().to_string(),
        message,
    };
    let url = place.url();
    let table = deltalake::DeltaTableBuilder::from_url(url.clone())
        .map_err(|e| fail(format!("cannot open it as a Delta table: {e}")))?
        .with_storage_backend(place.store.clone(), url)
        .load()
        .await
        .map_err(|e| {
            fail(format!(
                "cannot open it as a Delta table ({e}); the `snowplow` format reads the lake loader's Delta table: point the location at the folder holding _delta_log"
            ))
        })?;
    let snapshot = table
        .snapshot()
        .map_err(|e| fail(format!("cannot read its Delta log: {e}")))?;
    let mut files = Vec::new();
    for file in snapshot.log_data() {
        let relative = file.object_store_path();
        let names: Vec<String> = relative.parts().map(|p| p.as_ref().to_string()).collect();
        let path: ObjectPath = place.prefix.parts().chain(relative.parts()).collect();
        let mut partitions: Vec<(String, String)> = file
            .partition_values_map()
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
        partitions.sort();
        files.push(DeltaFile {
            path,
            names,
            partitions,
        });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}
