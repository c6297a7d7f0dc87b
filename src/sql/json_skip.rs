//! `json_get_str`, `json_get_int`, `json_get_float`, `json_get_bool` and `json_as_text` that
//! answer NULL without parsing when a document cannot hold the path's keys.
//!
//! Event JSON is sparse: `context.campaign` is on a few percent of events, and a trait reading
//! it parsed every document to find the key missing. A key `k` of an object is written `"k"`
//! in the document's text unless one of its characters is escaped, and an escape needs a
//! backslash. So a document with no backslash that does not contain `"k"` for some key of the
//! path has no value there: NULL, as the parser would have said. Every other row (a document
//! with a backslash, one that contains every key, an array index in the path) goes to
//! datafusion-functions-json's own function, so results are the same row for row; only the
//! documents that cannot match skip the parse. A batch where most rows may match goes to the
//! parser whole.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, UInt32Array};
use arrow::datatypes::DataType;
use datafusion::common::{Result, ScalarValue};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, ExpressionPlacement, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature,
};

/// The functions wrapped, replacing datafusion-functions-json's under the same names.
pub fn udfs() -> Vec<ScalarUDF> {
    use datafusion_functions_json::udfs;
    [
        udfs::json_get_str_udf(),
        udfs::json_get_int_udf(),
        udfs::json_get_float_udf(),
        udfs::json_get_bool_udf(),
        udfs::json_as_text_udf(),
    ]
    .into_iter()
    .map(|inner| ScalarUDF::new_from_impl(SkipAbsent { inner }))
    .collect()
}

/// A JSON getter that skips documents which cannot hold its path.
#[derive(Debug, PartialEq, Eq, Hash)]
struct SkipAbsent {
    inner: Arc<ScalarUDF>,
}

/// Below this share of rows that may hold the path, the others are skipped; above it the
/// batch is parsed whole (picking the rows out and putting them back costs more).
const MOST: f64 = 0.75;

impl ScalarUDFImpl for SkipAbsent {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(
        &self,
        args: datafusion::logical_expr::ReturnFieldArgs,
    ) -> Result<arrow::datatypes::FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn placement(&self, args: &[ExpressionPlacement]) -> ExpressionPlacement {
        self.inner.placement(args)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let Some(keys) = args.args.get(1..).and_then(object_keys) else {
            return self.inner.invoke_with_args(args);
        };
        let ColumnarValue::Array(docs) = &args.args[0] else {
            return self.inner.invoke_with_args(args);
        };
        let Some(may) = may_hold(docs.as_ref(), &keys) else {
            return self.inner.invoke_with_args(args);
        };
        if may.is_empty() {
            let none = arrow::array::new_null_array(args.return_field.data_type(), docs.len());
            return Ok(ColumnarValue::Array(none));
        }
        if may.len() as f64 > MOST * docs.len() as f64 {
            return self.inner.invoke_with_args(args);
        }
        let rows = UInt32Array::from(may);
        let picked = arrow::compute::take(docs.as_ref(), &rows, None)?;
        let mut inner_args = args.args.clone();
        inner_args[0] = ColumnarValue::Array(picked);
        let answered = self.inner.invoke_with_args(ScalarFunctionArgs {
            args: inner_args,
            arg_fields: args.arg_fields.clone(),
            number_rows: rows.len(),
            return_field: args.return_field.clone(),
            config_options: args.config_options.clone(),
        })?;
        let answered = answered.into_array(rows.len())?;
        // Each row's place in `answered`, or NULL (no value) for a skipped row.
        let mut place: Vec<Option<u32>> = vec![None; docs.len()];
        for (i, &row) in rows.values().iter().enumerate() {
            place[row as usize] = Some(i as u32);
        }
        let out: ArrayRef =
            arrow::compute::take(answered.as_ref(), &UInt32Array::from(place), None)?;
        Ok(ColumnarValue::Array(out))
    }
}

/// The path's keys as they appear in a document's text (`"key"`), when every path element is
/// a literal object key; `None` (parse every row) for an array index, a path from a column or
/// a key that itself needs escaping.
fn object_keys(path: &[ColumnarValue]) -> Option<Vec<Vec<u8>>> {
    if path.is_empty() {
        return None;
    }
    path.iter()
        .map(|p| match p {
            ColumnarValue::Scalar(
                ScalarValue::Utf8(Some(k))
                | ScalarValue::LargeUtf8(Some(k))
                | ScalarValue::Utf8View(Some(k)),
            ) if !k.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) => {
                let mut quoted = Vec::with_capacity(k.len() + 2);
                quoted.push(b'"');
                quoted.extend_from_slice(k.as_bytes());
                quoted.push(b'"');
                Some(quoted)
            }
            _ => None,
        })
        .collect()
}

/// The rows whose document may hold every key; `None` for arrays of other types (dictionaries
/// go to the parser, which handles them).
fn may_hold(docs: &dyn Array, keys: &[Vec<u8>]) -> Option<Vec<u32>> {
    let finders: Vec<memchr::memmem::Finder> =
        keys.iter().map(memchr::memmem::Finder::new).collect();
    let may = |doc: Option<&[u8]>| match doc {
        None => false,
        Some(d) => {
            memchr::memchr(b'\\', d).is_some() || finders.iter().all(|f| f.find(d).is_some())
        }
    };
    let rows: Vec<u32> = match docs.data_type() {
        DataType::Utf8 => pick(
            docs.as_string::<i32>().iter().map(|d| d.map(str::as_bytes)),
            may,
        ),
        DataType::LargeUtf8 => pick(
            docs.as_string::<i64>().iter().map(|d| d.map(str::as_bytes)),
            may,
        ),
        DataType::Utf8View => pick(
            docs.as_string_view().iter().map(|d| d.map(str::as_bytes)),
            may,
        ),
        _ => return None,
    };
    Some(rows)
}

fn pick<'a>(
    docs: impl Iterator<Item = Option<&'a [u8]>>,
    may: impl Fn(Option<&[u8]>) -> bool,
) -> Vec<u32> {
    docs.enumerate()
        .filter(|(_, d)| may(*d))
        .map(|(i, _)| i as u32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::StringArray;
    use datafusion::prelude::SessionContext;
    use proptest::prelude::*;

    /// Runs `call` (a getter over column `doc`) with datafusion-functions-json's functions and
    /// with these, over `docs`; both answers as text.
    async fn both(docs: Vec<Option<String>>, call: &str) -> (Vec<String>, Vec<String>) {
        let batch = arrow::array::RecordBatch::try_from_iter([(
            "doc",
            Arc::new(StringArray::from(docs)) as ArrayRef,
        )])
        .unwrap();
        let mut answers = Vec::new();
        for skipping in [false, true] {
            // Batches of 16 rows: some all skipped, some mixed, some parsed whole.
            let mut ctx = SessionContext::new_with_config(
                datafusion::prelude::SessionConfig::new().with_batch_size(16),
            );
            datafusion_functions_json::register_all(&mut ctx).unwrap();
            if skipping {
                for udf in udfs() {
                    ctx.register_udf(udf);
                }
            }
            ctx.register_batch("t", batch.clone()).unwrap();
            let out = ctx
                .sql(&format!("SELECT CAST({call} AS VARCHAR) AS v FROM t"))
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
            let text: Vec<String> = out
                .iter()
                .flat_map(|b| {
                    let a = arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
                    let a = a.as_string::<i32>().clone();
                    (0..a.len())
                        .map(|i| {
                            if a.is_null(i) {
                                "NULL".into()
                            } else {
                                a.value(i).to_string()
                            }
                        })
                        .collect::<Vec<String>>()
                })
                .collect();
            answers.push(text);
        }
        let skipped = answers.pop().unwrap();
        (answers.pop().unwrap(), skipped)
    }

    /// A key as a document may write it: plain, or with its first character escaped.
    fn written(key: &str, escaped: bool) -> String {
        let mut chars = key.chars();
        match (escaped, chars.next()) {
            (true, Some(c)) => format!("\\u{:04x}{}", c as u32, chars.as_str()),
            _ => key.to_string(),
        }
    }

    fn doc() -> impl Strategy<Value = Option<String>> {
        let key = prop::sample::select(vec!["a", "b", "campaign", "source"]);
        let leaf = prop_oneof![
            Just("1".to_string()),
            Just("2.5".to_string()),
            Just("true".to_string()),
            Just("\"x\"".to_string()),
            Just("\"a\"".to_string()),
            Just("null".to_string()),
            Just("[1,\"b\"]".to_string()),
        ];
        let value = leaf.prop_recursive(2, 8, 3, move |inner| {
            prop::collection::vec((key.clone(), any::<bool>(), inner), 0..3).prop_map(|fields| {
                let body: Vec<String> = fields
                    .iter()
                    .map(|(k, e, v)| format!("\"{}\":{}", written(k, *e), v))
                    .collect();
                format!("{{{}}}", body.join(","))
            })
        });
        prop_oneof![
            8 => value.prop_map(Some),
            1 => Just(None),
            1 => Just(Some("{\"campaign\": ".to_string())),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn getters_answer_as_the_parser_does_row_for_row(
            docs in prop::collection::vec(doc(), 1..80),
            path in prop::collection::vec(prop::sample::select(vec!["a", "b", "campaign", "source"]), 1..3),
            getter in prop::sample::select(vec!["json_get_str", "json_get_int", "json_get_float", "json_get_bool", "json_as_text"]),
        ) {
            let keys: Vec<String> = path.iter().map(|k| format!("'{k}'")).collect();
            let call = format!("{getter}(doc, {})", keys.join(", "));
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let (parsed, skipped) = rt.block_on(both(docs, &call));
            prop_assert_eq!(parsed, skipped);
        }
    }

    #[test]
    fn a_document_without_the_key_is_not_parsed_and_one_with_it_is() {
        let keys = object_keys(&[ColumnarValue::Scalar(ScalarValue::Utf8(Some(
            "campaign".into(),
        )))])
        .unwrap();
        let docs = StringArray::from(vec![
            Some(r#"{"page":{"path":"/"}}"#),
            Some(r#"{"campaign":{"source":"x"}}"#),
            None,
            Some(r#"{"\u0063ampaign":{"source":"x"}}"#),
            Some(r#"{"note":"campaign"}"#),
        ]);
        assert_eq!(may_hold(&docs, &keys).unwrap(), [1, 3, 4]);
        // An array index or a key that needs escaping: every row is parsed.
        assert!(object_keys(&[ColumnarValue::Scalar(ScalarValue::Int64(Some(0)))]).is_none());
        assert!(object_keys(&[ColumnarValue::Scalar(ScalarValue::Utf8(Some(
            "a\"b".into()
        )))])
        .is_none());
    }
}
