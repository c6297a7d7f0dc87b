//! Is this text one JSON value? The ingest check runs on every row's `traits`, `properties`
//! and `context`, so it only walks the bytes: no values, no allocation, no decoding of strings.
//! It accepts exactly what `serde_json` accepts (RFC 8259; see the property test), except that
//! nesting deeper than [`MAX_DEPTH`] is refused.

/// Name of the JSON check used at ingest; also available to users' SQL.
pub const IS_JSON: &str = "is_json";

/// Deepest nesting of arrays and objects accepted (serde_json's own limit is 128).
pub const MAX_DEPTH: usize = 128;

/// True when `text` is exactly one JSON value, with optional whitespace around it.
pub fn is_json(text: &str) -> bool {
    let b = text.as_bytes();
    match value(b, skip_ws(b, 0), 0) {
        Some(end) => skip_ws(b, end) == b.len(),
        None => false,
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// The value starting at `i`; returns the index just past it.
fn value(b: &[u8], i: usize, depth: usize) -> Option<usize> {
    match *b.get(i)? {
        b'{' => object(b, i + 1, depth + 1),
        b'[' => array(b, i + 1, depth + 1),
        b'"' => string(b, i + 1),
        b't' => literal(b, i, b"true"),
        b'f' => literal(b, i, b"false"),
        b'n' => literal(b, i, b"null"),
        b'-' | b'0'..=b'9' => number(b, i),
        _ => None,
    }
}

fn literal(b: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    b.get(i..i + word.len())
        .filter(|w| *w == word)
        .map(|_| i + word.len())
}

/// Whether any of the eight bytes of `w` is a quote, a backslash or a control character:
/// the only bytes a string's scan must stop at.
fn stops_in(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte of `x` is zero, or below 0x20, where the subtraction borrows into its high bit
    // and the byte's own high bit is clear. Borrows can mark a later byte too, but the word
    // is then scanned byte by byte, so a stray mark costs time, never correctness.
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    (zero(w ^ (ONES * u64::from(b'"'))) | zero(w ^ (ONES * u64::from(b'\\'))) | control) != 0
}

/// A string whose opening quote is just before `i`.
fn string(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        // Eight plain bytes at a time: a row's JSON is mostly string bytes.
        while let Some(word) = b.get(i..i + 8) {
            let w = u64::from_le_bytes(word.try_into().expect("eight bytes"));
            if stops_in(w) {
                break;
            }
            i += 8;
        }
        match *b.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => match *b.get(i + 1)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                b'u' => {
                    let hex = b.get(i + 2..i + 6)?;
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return None;
                    }
                    i += 6;
                }
                _ => return None,
            },
            // Control characters must be escaped.
            0x00..=0x1f => return None,
            _ => i += 1,
        }
    }
}

fn digits(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    i
}

fn number(b: &[u8], mut i: usize) -> Option<usize> {
    if b[i] == b'-' {
        i += 1;
    }
    match *b.get(i)? {
        b'0' => i += 1,
        b'1'..=b'9' => i = digits(b, i),
        _ => return None,
    }
    if b.get(i) == Some(&b'.') {
        let end = digits(b, i + 1);
        if end == i + 1 {
            return None;
        }
        i = end;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let end = digits(b, i);
        if end == i {
            return None;
        }
        i = end;
    }
    Some(i)
}

/// An array whose `[` is just before `i`.
fn array(b: &[u8], i: usize, depth: usize) -> Option<usize> {
    if depth > MAX_DEPTH {
        return None;
    }
    let mut i = skip_ws(b, i);
    if *b.get(i)? == b']' {
        return Some(i + 1);
    }
    loop {
        i = skip_ws(b, value(b, i, depth)?);
        match *b.get(i)? {
            b',' => i = skip_ws(b, i + 1),
            b']' => return Some(i + 1),
            _ => return None,
        }
    }
}

/// An object whose `{` is just before `i`.
fn object(b: &[u8], i: usize, depth: usize) -> Option<usize> {
    if depth > MAX_DEPTH {
        return None;
    }
    let mut i = skip_ws(b, i);
    if *b.get(i)? == b'}' {
        return Some(i + 1);
    }
    loop {
        if *b.get(i)? != b'"' {
            return None;
        }
        i = skip_ws(b, string(b, i + 1)?);
        if *b.get(i)? != b':' {
            return None;
        }
        i = skip_ws(b, value(b, skip_ws(b, i + 1), depth)?);
        match *b.get(i)? {
            b',' => i = skip_ws(b, i + 1),
            b'}' => return Some(i + 1),
            _ => return None,
        }
    }
}

/// `is_json(text) -> boolean`: true when the text parses as JSON (NULL stays NULL).
pub fn is_json_udf() -> datafusion::logical_expr::ScalarUDF {
    datafusion::logical_expr::create_udf(
        IS_JSON,
        vec![arrow::datatypes::DataType::Utf8],
        arrow::datatypes::DataType::Boolean,
        datafusion::logical_expr::Volatility::Immutable,
        std::sync::Arc::new(is_json_impl),
    )
}

fn is_json_impl(
    args: &[datafusion::logical_expr::ColumnarValue],
) -> datafusion::error::Result<datafusion::logical_expr::ColumnarValue> {
    let arrays = datafusion::logical_expr::ColumnarValue::values_to_arrays(args)?;
    let text = datafusion::common::cast::as_string_array(&arrays[0])?;
    let result: arrow::array::BooleanArray = text.iter().map(|v| v.map(is_json)).collect();
    Ok(datafusion::logical_expr::ColumnarValue::Array(
        std::sync::Arc::new(result) as arrow::array::ArrayRef,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn serde_accepts(text: &str) -> bool {
        serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
    }

    #[test]
    fn examples() {
        for ok in [
            r#"{"a": [1, 2, {"b": null}]}"#,
            "  {}  ",
            "\"text\"",
            r#"{"emoji": "\ud83d\ude00", "n": -1.5e3, "z": 0, "t": true, "f": false}"#,
            "[[], {}, \"\", -0.0e+1]",
            "\r\n[1]\t",
        ] {
            assert!(is_json(ok), "{ok}");
            assert!(serde_accepts(ok), "{ok}");
        }
        for bad in [
            r#"{"a": 1"#,
            "{a: 1}",
            "",
            "   ",
            "{} {}",
            "[1,]",
            "{\"a\":1,}",
            "NaN",
            r#""\x""#,
            "{\"a\": tru}",
            "01",
            "1.",
            "1e",
            "-",
            ".5",
            "\"line\nbreak\"",
            r#""\u12G4""#,
            "[1 2]",
            "{\"a\" 1}",
            "\"open",
        ] {
            assert!(!is_json(bad), "{bad:?}");
            assert!(!serde_accepts(bad), "{bad:?}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert!(!is_json(&deep));
        let fine = "[".repeat(100) + &"]".repeat(100);
        assert!(is_json(&fine));
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            (-1e12f64..1e12).prop_map(|n| serde_json::json!(n)),
            ".{0,12}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                prop::collection::btree_map(".{0,6}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn agrees_with_serde_json_on_near_json_text(text in r#"[\[\]{}",: 0-9.eE+\-tfnrulas\\\n]{0,24}"#) {
            prop_assert_eq!(is_json(&text), serde_accepts(&text), "{:?}", text);
        }

        /// Strings long enough to be scanned eight bytes at a time, with a quote, backslash or
        /// control character anywhere in them.
        #[test]
        fn strings_agree_with_serde_json_wherever_their_stops_fall(body in r#"[a-z \u{e9}\u{1F600}"\\\t\x00\x1f/nu0-9]{0,40}"#) {
            let text = format!("\"{body}\"");
            prop_assert_eq!(is_json(&text), serde_accepts(&text), "{:?}", text);
        }

        #[test]
        fn accepts_what_serde_json_writes(v in json_value(), pretty in any::<bool>()) {
            let text = if pretty { serde_json::to_string_pretty(&v) } else { serde_json::to_string(&v) }.unwrap();
            prop_assert!(is_json(&text), "{}", text);
        }

        #[test]
        fn refuses_cut_json(v in json_value(), cut in 0usize..64) {
            let text = serde_json::to_string(&v).unwrap();
            let mut end = cut.min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let part = &text[..end];
            prop_assert_eq!(is_json(part), serde_accepts(part), "{:?}", part);
        }
    }
}
