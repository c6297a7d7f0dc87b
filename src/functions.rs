//! SQL functions Tessera adds to DataFusion for traits and segments: `most_frequent(x)` and
//! `as_of()` (the run's as-of time, so relative windows are reproducible).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray};
use arrow::datatypes::DataType;
use chrono::{DateTime, Utc};
use datafusion::common::ScalarValue;
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::{
    create_udaf, create_udf, Accumulator, AggregateUDF, ColumnarValue, ScalarUDF, Volatility,
};

/// `most_frequent(text) -> text`: the value seen most often; ties go to the alphabetically
/// first value, NULLs are ignored (Segment's "most frequent" computed trait).
pub fn most_frequent() -> AggregateUDF {
    create_udaf(
        "most_frequent",
        vec![DataType::Utf8],
        Arc::new(DataType::Utf8),
        Volatility::Immutable,
        Arc::new(|_| Ok(Box::new(MostFrequent::default()))),
        // Partial states travel as JSON text: {"value": count, …}.
        Arc::new(vec![DataType::Utf8]),
    )
}

#[derive(Debug, Default)]
struct MostFrequent {
    counts: HashMap<String, u64>,
}

impl Accumulator for MostFrequent {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        let values = arrow::compute::cast(&values[0], &DataType::Utf8)?;
        for v in values.as_string::<i32>().iter().flatten() {
            *self.counts.entry(v.to_string()).or_default() += 1;
        }
        Ok(())
    }

    fn evaluate(&mut self) -> DfResult<ScalarValue> {
        let best = self
            .counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
            .map(|(v, _)| v.clone());
        Ok(ScalarValue::Utf8(best))
    }

    fn size(&self) -> usize {
        std::mem::size_of::<Self>() + self.counts.keys().map(|k| k.capacity() + 48).sum::<usize>()
    }

    fn state(&mut self) -> DfResult<Vec<ScalarValue>> {
        let json = serde_json::to_string(&self.counts)
            .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
        Ok(vec![ScalarValue::Utf8(Some(json))])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> DfResult<()> {
        let states = arrow::compute::cast(&states[0], &DataType::Utf8)?;
        for s in states.as_string::<i32>().iter().flatten() {
            let part: HashMap<String, u64> = serde_json::from_str(s)
                .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
            for (k, n) in part {
                *self.counts.entry(k).or_default() += n;
            }
        }
        Ok(())
    }
}

/// `as_of() -> timestamp`: the run's as-of time (`--as-of`, default the run's start).
pub fn as_of(at: DateTime<Utc>) -> ScalarUDF {
    let micros = at.timestamp_micros();
    create_udf(
        "as_of",
        vec![],
        crate::ingest::timestamp_type(),
        Volatility::Stable,
        Arc::new(move |_: &[ColumnarValue]| {
            Ok(ColumnarValue::Scalar(ScalarValue::TimestampMicrosecond(
                Some(micros),
                Some("UTC".into()),
            )))
        }),
    )
}
