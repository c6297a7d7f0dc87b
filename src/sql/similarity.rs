//! String and date similarity for probabilistic matching: `jaro_winkler(a, b)` in SQL (blocking
//! rules and users' own queries may use it), and the plain functions the matching stage calls
//! on whole columns. DataFusion already has `levenshtein`; Jaro-Winkler comes from `strsim`,
//! whose implementation is the one Splink's users compare against.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array};
use arrow::datatypes::DataType;
use chrono::{Datelike, NaiveDate};
use datafusion::common::cast::as_string_array;
use datafusion::error::Result;
use datafusion::logical_expr::{create_udf, ColumnarValue, ScalarUDF, Volatility};

/// The SQL name of the Jaro-Winkler similarity.
pub const JARO_WINKLER: &str = "jaro_winkler";

/// Jaro-Winkler similarity in [0, 1]: 1 for equal text, 0 for nothing in common.
pub fn jaro_winkler(a: &str, b: &str) -> f64 {
    strsim::jaro_winkler(a, b)
}

/// Levenshtein distance in characters.
pub fn levenshtein(a: &str, b: &str) -> usize {
    strsim::levenshtein(a, b)
}

/// A date written `YYYY-MM-DD`, `YYYYMMDD` or `YYYY/MM/DD`; `None` for anything else, so
/// that a malformed date never agrees by accident.
pub fn parse_date(text: &str) -> Option<NaiveDate> {
    let t = text.trim();
    let digits: String = t.chars().filter(|c| c.is_ascii_digit()).collect();
    let plain = t.len() == 8 && digits.len() == 8;
    let separated = t.len() == 10 && digits.len() == 8 && {
        let b = t.as_bytes();
        b[4] == b[7] && (b[4] == b'-' || b[4] == b'/')
    };
    if !(plain || separated) {
        return None;
    }
    let (y, m, d) = (
        digits[0..4].parse().ok()?,
        digits[4..6].parse().ok()?,
        digits[6..8].parse().ok()?,
    );
    NaiveDate::from_ymd_opt(y, m, d)
}

/// Whether two different dates are the same once one's day and month are swapped (a record
/// written in the other convention).
pub fn swapped_day_month(a: NaiveDate, b: NaiveDate) -> bool {
    a != b && a.year() == b.year() && a.month() == b.day() && a.day() == b.month()
}

/// `jaro_winkler(a, b)` for SQL: null when either side is null.
pub fn jaro_winkler_udf() -> ScalarUDF {
    create_udf(
        JARO_WINKLER,
        vec![DataType::Utf8, DataType::Utf8],
        DataType::Float64,
        Volatility::Immutable,
        Arc::new(jaro_winkler_impl),
    )
}

fn jaro_winkler_impl(args: &[ColumnarValue]) -> Result<ColumnarValue> {
    let scalar = args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_)));
    let arrays = ColumnarValue::values_to_arrays(args)?;
    let (a, b) = (as_string_array(&arrays[0])?, as_string_array(&arrays[1])?);
    let out: Float64Array = (0..a.len())
        .map(|i| (a.is_valid(i) && b.is_valid(i)).then(|| jaro_winkler(a.value(i), b.value(i))))
        .collect();
    let out: ArrayRef = Arc::new(out);
    if scalar {
        return Ok(ColumnarValue::Scalar(
            datafusion::common::ScalarValue::try_from_array(&out, 0)?,
        ));
    }
    Ok(ColumnarValue::Array(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from the Jaro-Winkler literature (Winkler 1990's examples, as restated in the
    /// record-linkage textbooks): MARTHA/MARHTA 0.961, DWAYNE/DUANE 0.84, DIXON/DICKSONX 0.813.
    #[test]
    fn jaro_winkler_matches_published_values() {
        for (a, b, want) in [
            ("MARTHA", "MARHTA", 0.961),
            ("DWAYNE", "DUANE", 0.840),
            ("DIXON", "DICKSONX", 0.813),
        ] {
            let got = jaro_winkler(a, b);
            assert!((got - want).abs() < 0.001, "{a}/{b}: {got}");
        }
        assert_eq!(jaro_winkler("same", "same"), 1.0);
        assert_eq!(jaro_winkler("abc", "xyz"), 0.0);
    }

    #[test]
    fn dates_parse_in_three_spellings_and_refuse_the_rest() {
        let d = NaiveDate::from_ymd_opt(1984, 3, 2);
        assert_eq!(parse_date("1984-03-02"), d);
        assert_eq!(parse_date("19840302"), d);
        assert_eq!(parse_date("1984/03/02"), d);
        for bad in [
            "1984-13-02",
            "19840230",
            "84-03-02",
            "",
            "1984-03/02",
            "abcd0302",
        ] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
        let a = NaiveDate::from_ymd_opt(1984, 3, 2).unwrap();
        let b = NaiveDate::from_ymd_opt(1984, 2, 3).unwrap();
        assert!(swapped_day_month(a, b));
        assert!(!swapped_day_month(a, a));
        assert!(!swapped_day_month(
            a,
            NaiveDate::from_ymd_opt(1985, 2, 3).unwrap()
        ));
    }
}
