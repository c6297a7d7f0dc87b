//! Landing formats: how each producer's files map onto Tessera's event columns.
//!
//! Nobody lands Segment-spec Parquet exactly: RudderStack and Segment Data Lakes flatten
//! properties, traits and context into columns, one table per event type, and Snowplow writes
//! one wide Delta table with self-describing events as structs. Each format here turns one file's
//! own schema into DataFusion expressions that give the Segment-spec columns (message id, type,
//! event, ids, times, and traits/properties/context as JSON text). Ingest applies them to the
//! file's scan before its checks, quarantine and deduplication, so every format is checked the
//! same way, and a file whose layout cannot be mapped is reported as skipped with the reason.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::{Column, DFSchema, ScalarValue};
use datafusion::logical_expr::{
    cast, lit, try_cast, ColumnarValue, Expr, ExprSchemable, ScalarUDF, Volatility,
};

use crate::config::EventFormat;
use crate::tables::{event, timestamp_type};

mod flat;
mod rudderstack;
mod segment_datalake;
mod snowplow;

pub use snowplow::list_delta_files;

/// How one file's rows become event rows.
#[derive(Debug)]
pub struct Mapping {
    /// One expression per output column, each aliased to its name.
    pub exprs: Vec<Expr>,
    /// The columns the expressions give.
    pub schema: SchemaRef,
}

/// What a file of a format holds.
pub enum Mapped {
    /// Events, read through the mapping.
    Events(Mapping),
    /// No events (RudderStack's `users` and `tracks` tables): not read, and not a problem.
    NotEvents,
}

/// Maps one file of `format`: `path` is its path's parts inside its store (folders, then the
/// file name), `raw` its own schema, `partitions` the `key=value` folders between the format's
/// location and the file (or the table log's partition values). `Err` says why
/// the file cannot be read as events (it is skipped with that reason); `None` for Segment-spec
/// files, which need no mapping.
pub fn map(
    format: EventFormat,
    path: &[String],
    raw: &Schema,
    partitions: &[(String, String)],
) -> std::result::Result<Option<Mapped>, String> {
    let built = match format {
        EventFormat::Segment => return Ok(None),
        EventFormat::Rudderstack => rudderstack::map(path, raw)?,
        EventFormat::SegmentDatalake => segment_datalake::map(raw, partitions)?,
        EventFormat::Snowplow => snowplow::map(raw, partitions)?,
    };
    let Some(columns) = built else {
        return Ok(Some(Mapped::NotEvents));
    };
    let df_schema = DFSchema::try_from(raw.clone()).map_err(|e| e.to_string())?;
    let mut fields = Vec::with_capacity(columns.len());
    let mut exprs = Vec::with_capacity(columns.len());
    for (name, expr) in columns {
        let expr = expr.alias(name.as_str());
        let (_, field) = expr
            .to_field(&df_schema)
            .map_err(|e| format!("cannot map column `{name}`: {e}"))?;
        fields.push(Field::new(name, field.data_type().clone(), true));
        exprs.push(expr);
    }
    Ok(Some(Mapped::Events(Mapping {
        exprs,
        schema: Arc::new(Schema::new(fields)),
    })))
}

/// A column of the producer's file.
pub(crate) fn col(name: &str) -> Expr {
    Expr::Column(Column::new_unqualified(name))
}

/// A NULL of text type.
pub(crate) fn null_text() -> Expr {
    lit(ScalarValue::Utf8(None))
}

pub(crate) fn is_text(dt: &DataType) -> bool {
    matches!(
        dt,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    )
}

/// Column `name` as text when the file has it; an error naming the column when it has it with
/// another type.
pub(crate) fn text(
    raw: &Schema,
    name: &str,
    role: &str,
) -> std::result::Result<Option<Expr>, String> {
    match raw.field_with_name(name) {
        Err(_) => Ok(None),
        Ok(f) if is_text(f.data_type()) => Ok(Some(cast(col(name), DataType::Utf8))),
        Ok(f) => Err(format!(
            "column `{name}` ({role}) is {} but must be text; fix the writer that lands these files",
            f.data_type()
        )),
    }
}

/// Column `name` as a UTC timestamp when the file has it. Timestamps of any unit convert;
/// integers are microseconds since the epoch (what RudderStack's Parquet writer stores when it
/// leaves out the timestamp annotation); text is parsed, and text that does not parse becomes
/// NULL (and its row is quarantined as missing its time).
pub(crate) fn time(
    raw: &Schema,
    name: &str,
    role: &str,
) -> std::result::Result<Option<Expr>, String> {
    let Ok(f) = raw.field_with_name(name) else {
        return Ok(None);
    };
    let expr = match f.data_type() {
        DataType::Timestamp(_, _) => try_cast(col(name), timestamp_type()),
        t if t.is_integer() => try_cast(cast(col(name), DataType::Int64), timestamp_type()),
        t if is_text(t) => try_cast(cast(col(name), DataType::Utf8), timestamp_type()),
        other => {
            return Err(format!(
                "column `{name}` ({role}) is {other}, which is not a time: it must be a timestamp, INT64 microseconds or ISO 8601 text"
            ))
        }
    };
    Ok(Some(expr))
}

/// The first non-NULL of `exprs`; NULL of `null` when there are none.
pub(crate) fn first_of(mut exprs: Vec<Expr>, null: Expr) -> Expr {
    match exprs.len() {
        0 => null,
        1 => exprs.remove(0),
        _ => datafusion::functions::core::expr_fn::coalesce(exprs),
    }
}

/// Whether a column of type `dt` can be written into JSON text. Binary cannot (it is not text);
/// for the rest, the JSON writer itself is asked, so a type it cannot encode (wherever it is
/// nested) leaves the column out of the JSON rather than failing the scan of every file.
pub(crate) fn json_writable(dt: &DataType) -> bool {
    if matches!(
        dt,
        DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
            | DataType::FixedSizeBinary(_)
    ) {
        return false;
    }
    let column = arrow::array::new_null_array(dt, 1);
    let schema = Arc::new(Schema::new(vec![Field::new("c", dt.clone(), true)]));
    let Ok(batch) = RecordBatch::try_new(schema, vec![column]) else {
        return false;
    };
    let mut writer = arrow::json::LineDelimitedWriter::new(Vec::new());
    writer.write(&batch).is_ok() && writer.finish().is_ok()
}

/// One key of a JSON object being built: a value, or an object of further keys.
pub(crate) enum Json {
    Value(Expr),
    Object(Vec<(String, Json)>),
}

/// The JSON text of an object with `keys` (keys whose value is NULL are left out; an object
/// with no keys left is NULL, as a Segment event without properties has none).
pub(crate) fn json_object(keys: Vec<(String, Json)>) -> Expr {
    match struct_of(keys) {
        Some(s) => json_text_udf().call(vec![s]),
        None => null_text(),
    }
}

fn struct_of(keys: Vec<(String, Json)>) -> Option<Expr> {
    let mut args = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (key, value) in keys {
        if !seen.insert(key.clone()) {
            continue;
        }
        let value = match value {
            Json::Value(e) => e,
            Json::Object(inner) => match struct_of(inner) {
                Some(s) => s,
                None => continue,
            },
        };
        args.push(lit(key));
        args.push(value);
    }
    (!args.is_empty()).then(|| datafusion::functions::core::expr_fn::named_struct(args))
}

/// `__tessera_json_text(struct)`: the struct as one JSON object per row, NULL fields left out.
pub(crate) fn json_text_udf() -> Arc<ScalarUDF> {
    Arc::new(ScalarUDF::new_from_impl(JsonText))
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct JsonText;

impl datafusion::logical_expr::ScalarUDFImpl for JsonText {
    fn name(&self) -> &str {
        "__tessera_json_text"
    }
    fn signature(&self) -> &datafusion::logical_expr::Signature {
        static SIGNATURE: std::sync::OnceLock<datafusion::logical_expr::Signature> =
            std::sync::OnceLock::new();
        SIGNATURE.get_or_init(|| datafusion::logical_expr::Signature::any(1, Volatility::Immutable))
    }
    fn return_type(&self, _: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(DataType::Utf8)
    }
    fn invoke_with_args(
        &self,
        args: datafusion::logical_expr::ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        Ok(ColumnarValue::Array(json_text(&arrays[0])?))
    }
}

fn json_text(array: &ArrayRef) -> datafusion::error::Result<ArrayRef> {
    let Some(s) = array.as_struct_opt() else {
        return Err(datafusion::error::DataFusionError::Execution(format!(
            "__tessera_json_text takes a struct, not {}",
            array.data_type()
        )));
    };
    let schema = Arc::new(Schema::new(s.fields().clone()));
    let batch = RecordBatch::try_new(schema, s.columns().to_vec())?;
    let mut buf = Vec::new();
    {
        let mut writer = arrow::json::LineDelimitedWriter::new(&mut buf);
        writer.write(&batch)?;
        writer.finish()?;
    }
    let text = String::from_utf8(buf)
        .map_err(|e| datafusion::error::DataFusionError::Execution(e.to_string()))?;
    let mut out = StringBuilder::with_capacity(s.len(), text.len());
    // The writer ends each row's object with a newline and escapes newlines inside strings,
    // so lines and rows correspond.
    for (i, line) in text.lines().enumerate() {
        if s.is_null(i) || line == "{}" {
            out.append_null();
        } else {
            out.append_value(line);
        }
    }
    Ok(Arc::new(out.finish()))
}

/// The type names the Segment spec gives a call, from a table or folder name.
pub(crate) fn call_type(table: &str) -> Option<&'static str> {
    Some(match table {
        "identify" | "identifies" => "identify",
        "page" | "pages" => "page",
        "screen" | "screens" => "screen",
        "group" | "groups" => "group",
        "alias" | "aliases" => "alias",
        _ => return None,
    })
}

/// The event columns every mapping gives, in order, with NULL placeholders.
pub(crate) struct EventColumns {
    pub message_id: Expr,
    pub kind: Expr,
    pub event: Expr,
    pub anonymous_id: Expr,
    pub user_id: Expr,
    pub timestamp: Expr,
    pub received_at: Expr,
    pub traits: Expr,
    pub properties: Expr,
    pub context: Expr,
    /// Further text columns kept on `events` under their own names (identifiers).
    pub extra: Vec<(String, Expr)>,
}

impl EventColumns {
    pub(crate) fn into_columns(self) -> Vec<(String, Expr)> {
        let mut out = vec![
            (event::MESSAGE_ID.to_string(), self.message_id),
            (event::TYPE.to_string(), self.kind),
            (event::EVENT.to_string(), self.event),
            (event::ANONYMOUS_ID.to_string(), self.anonymous_id),
            (event::USER_ID.to_string(), self.user_id),
            (event::TIMESTAMP.to_string(), self.timestamp),
            (event::RECEIVED_AT.to_string(), self.received_at),
            (event::TRAITS.to_string(), self.traits),
            (event::PROPERTIES.to_string(), self.properties),
            (event::CONTEXT.to_string(), self.context),
        ];
        out.extend(self.extra);
        out
    }
}

/// A NULL timestamp.
pub(crate) fn null_time() -> Expr {
    lit(ScalarValue::TimestampMicrosecond(None, Some("UTC".into())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray, StructArray};
    use arrow::datatypes::Fields;

    #[test]
    fn json_text_leaves_out_nulls_and_gives_null_for_empty_or_null_objects() {
        let fields = Fields::from(vec![
            Field::new("sku", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]);
        let s = StructArray::new(
            fields,
            vec![
                Arc::new(StringArray::from(vec![Some("a\nb"), None, Some("c")])),
                Arc::new(Int64Array::from(vec![Some(2), None, Some(3)])),
            ],
            Some(vec![true, true, false].into()),
        );
        let out = json_text(&(Arc::new(s) as ArrayRef)).unwrap();
        let out = out.as_string::<i32>();
        assert_eq!(out.value(0), r#"{"sku":"a\nb","n":2}"#);
        assert!(out.is_null(1), "an object with no keys is NULL");
        assert!(out.is_null(2), "a NULL struct is NULL");
    }

    #[test]
    fn binary_is_not_carried_into_json() {
        assert!(json_writable(&DataType::Utf8));
        assert!(!json_writable(&DataType::Binary));
    }
}
