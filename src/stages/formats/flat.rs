//! The mapping shared by the flattened layouts (RudderStack's lake, Segment Data Lakes): one
//! table per call type or event, fixed columns for the ids and times, and every property, trait
//! and context field as a column of its own, which are gathered back into JSON objects.

use arrow::datatypes::Schema;
use datafusion::logical_expr::{lit, Expr};

use super::{
    col, first_of, json_object, json_writable, null_text, null_time, text, time, EventColumns, Json,
};

/// A flattened layout's names.
pub(crate) struct Flat<'a> {
    pub raw: &'a Schema,
    /// The Segment call type the file holds.
    pub kind: &'static str,
    /// The event name used when a track file's rows carry none (its table or folder name).
    pub event_name: Option<String>,
    /// The message id's column, first found wins.
    pub message_id: &'static [&'static str],
    /// The anonymous id's columns, first non-NULL wins.
    pub anonymous_id: &'static [&'static str],
    /// The event time's columns, first non-NULL wins.
    pub timestamp: &'static [&'static str],
    /// Columns that are neither properties nor traits (ids, times, loader bookkeeping).
    pub reserved: &'static [&'static str],
    /// Whether `properties_*` and `traits_*` columns name their object (Segment Data Lakes).
    pub prefixed: bool,
    /// Names the producer in messages.
    pub producer: &'static str,
}

/// The columns Tessera keeps on `events` as they are, when a file has them.
const KEPT: &[&str] = &["previous_id", "group_id"];

impl Flat<'_> {
    pub(crate) fn map(self) -> std::result::Result<Vec<(String, Expr)>, String> {
        let raw = self.raw;
        let mut message_id = None;
        for name in self.message_id {
            if let Some(e) = text(raw, name, "the message id")? {
                message_id = Some(e);
                break;
            }
        }
        let Some(message_id) = message_id else {
            return Err(format!(
                "no message id column (`{}`); every {} table has one. Is `format` right for this location?",
                self.message_id.join("` or `"),
                self.producer
            ));
        };
        let mut anonymous = Vec::new();
        for name in self.anonymous_id {
            anonymous.extend(text(raw, name, "the anonymous id")?);
        }
        let mut times = Vec::new();
        for name in self.timestamp {
            times.extend(time(raw, name, "the event time")?);
        }
        if times.is_empty() {
            return Err(format!(
                "no time column: it needs one of `{}`",
                self.timestamp.join("`, `")
            ));
        }
        let event = if self.kind == "track" {
            let mut names = Vec::new();
            names.extend(text(raw, "event", "the event name")?);
            names.extend(text(raw, "event_text", "the event name")?);
            names.extend(self.event_name.clone().map(lit));
            first_of(names, null_text())
        } else {
            null_text()
        };
        let mut context = Vec::new();
        let mut context_traits = Vec::new();
        let mut properties = Vec::new();
        let mut traits = Vec::new();
        let mut extra = Vec::new();
        for field in raw.fields() {
            let name = field.name().as_str();
            if KEPT.contains(&name) {
                if let Some(e) = text(raw, name, "an id")? {
                    extra.push((name.to_string(), e));
                }
                continue;
            }
            if self.reserved.contains(&name)
                || self.anonymous_id.contains(&name)
                || self.timestamp.contains(&name)
                || self.message_id.contains(&name)
                || !json_writable(field.data_type())
            {
                continue;
            }
            let value = Json::Value(col(name));
            if let Some(key) = name.strip_prefix("context_traits_") {
                context_traits.push((key.to_string(), value));
            } else if let Some(key) = name.strip_prefix("context_") {
                context.push((key.to_string(), value));
            } else if let (true, Some(key)) = (self.prefixed, name.strip_prefix("properties_")) {
                properties.push((key.to_string(), value));
            } else if let (true, Some(key)) = (self.prefixed, name.strip_prefix("traits_")) {
                traits.push((key.to_string(), value));
            } else if matches!(self.kind, "identify" | "group") {
                traits.push((name.to_string(), value));
            } else {
                properties.push((name.to_string(), value));
            }
        }
        if !context_traits.is_empty() {
            context.push(("traits".to_string(), Json::Object(context_traits)));
        }
        let columns = EventColumns {
            message_id,
            kind: lit(self.kind),
            event,
            anonymous_id: first_of(anonymous, null_text()),
            user_id: text(raw, "user_id", "the user id")?.unwrap_or_else(null_text),
            timestamp: first_of(times, null_time()),
            received_at: time(raw, "received_at", "when it was received")?
                .unwrap_or_else(null_time),
            traits: json_object(traits),
            properties: json_object(properties),
            context: json_object(context),
            extra,
        };
        Ok(columns.into_columns())
    }
}
