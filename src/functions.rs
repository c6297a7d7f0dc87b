//! SQL functions Tessera adds to DataFusion for traits and segments: `most_frequent(x)` and
//! `as_of()` (the run's as-of time, so relative windows are reproducible).

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, StringArray};
use arrow::datatypes::{DataType, Field, FieldRef};
use chrono::{DateTime, Utc};
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    create_udf, Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, EmitTo,
    GroupsAccumulator, ScalarUDF, Signature, Volatility,
};

/// `most_frequent(text) -> text`: the value seen most often; ties go to the alphabetically
/// first value, NULLs are ignored (Segment's "most frequent" computed trait).
pub fn most_frequent() -> AggregateUDF {
    AggregateUDF::new_from_impl(MostFrequentUdaf {
        signature: Signature::exact(vec![DataType::Utf8], Volatility::Immutable),
    })
}

/// `most_frequent` with a grouped accumulator: one object holds every group's counts, so a
/// GROUP BY over millions of profiles is not millions of accumulator objects fed row slices.
#[derive(Debug, PartialEq, Eq, Hash)]
struct MostFrequentUdaf {
    signature: Signature,
}

impl AggregateUDFImpl for MostFrequentUdaf {
    fn name(&self) -> &str {
        "most_frequent"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Utf8)
    }

    fn accumulator(&self, _: AccumulatorArgs) -> DfResult<Box<dyn Accumulator>> {
        Ok(Box::new(MostFrequent::default()))
    }

    // Partial states travel as JSON text: {"value": count, …}.
    fn state_fields(&self, args: StateFieldsArgs) -> DfResult<Vec<FieldRef>> {
        Ok(vec![Field::new(
            format_state_name(args.name, "counts"),
            DataType::Utf8,
            true,
        )
        .into()])
    }

    fn groups_accumulator_supported(&self, _: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        _: AccumulatorArgs,
    ) -> DfResult<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(MostFrequentGroups::default()))
    }
}

type Counts = std::collections::HashMap<Box<str>, u64, foldhash::fast::RandomState>;

/// The most frequent value of `counts`, ties to the alphabetically first.
fn most_frequent_of(counts: &Counts) -> Option<&str> {
    counts
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
        .map(|(v, _)| v.as_ref())
}

fn counts_json(counts: &Counts) -> DfResult<String> {
    serde_json::to_string(counts).map_err(|e| DataFusionError::External(Box::new(e)))
}

fn parse_counts(text: &str) -> DfResult<Counts> {
    serde_json::from_str(text).map_err(|e| DataFusionError::External(Box::new(e)))
}

#[derive(Debug, Default)]
struct MostFrequentGroups {
    groups: Vec<Counts>,
    /// Bytes held by the counts, kept up to date as values are added.
    bytes: usize,
}

impl MostFrequentGroups {
    fn add(&mut self, group: usize, value: &str, n: u64) {
        let counts = &mut self.groups[group];
        match counts.get_mut(value) {
            Some(c) => *c += n,
            None => {
                self.bytes += value.len() + COUNT_OVERHEAD;
                counts.insert(value.into(), n);
            }
        }
    }

    fn take(&mut self, emit_to: EmitTo) -> Vec<Counts> {
        let taken = emit_to.take_needed(&mut self.groups);
        let freed: usize = taken
            .iter()
            .flat_map(|c| c.keys())
            .map(|k| k.len() + COUNT_OVERHEAD)
            .sum();
        self.bytes = self.bytes.saturating_sub(freed);
        taken
    }
}

/// Bytes a counted value costs besides its text: the key's pointer and length, the count,
/// the table's control byte and slack.
const COUNT_OVERHEAD: usize = 40;

fn passes(filter: Option<&BooleanArray>, row: usize) -> bool {
    filter.is_none_or(|f| f.is_valid(row) && f.value(row))
}

impl GroupsAccumulator for MostFrequentGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> DfResult<()> {
        self.groups.resize_with(total_num_groups, Counts::default);
        let values = arrow::compute::cast(&values[0], &DataType::Utf8)?;
        let values = values.as_string::<i32>();
        for (row, &group) in group_indices.iter().enumerate() {
            if values.is_valid(row) && passes(opt_filter, row) {
                self.add(group, values.value(row), 1);
            }
        }
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> DfResult<ArrayRef> {
        let groups = self.take(emit_to);
        let best: StringArray = groups.iter().map(most_frequent_of).collect();
        Ok(Arc::new(best))
    }

    fn state(&mut self, emit_to: EmitTo) -> DfResult<Vec<ArrayRef>> {
        let groups = self.take(emit_to);
        let json = groups
            .iter()
            .map(|c| counts_json(c).map(Some))
            .collect::<DfResult<StringArray>>()?;
        Ok(vec![Arc::new(json)])
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> DfResult<()> {
        self.groups.resize_with(total_num_groups, Counts::default);
        let states = arrow::compute::cast(&values[0], &DataType::Utf8)?;
        let states = states.as_string::<i32>();
        for (row, &group) in group_indices.iter().enumerate() {
            if states.is_valid(row) {
                for (value, n) in parse_counts(states.value(row))? {
                    self.add(group, &value, n);
                }
            }
        }
        Ok(())
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> DfResult<Vec<ArrayRef>> {
        // Each row on its own: {"value": 1}, or no counts at all.
        let values = arrow::compute::cast(&values[0], &DataType::Utf8)?;
        let values = values.as_string::<i32>();
        let states = (0..values.len())
            .map(|row| {
                if values.is_valid(row) && passes(opt_filter, row) {
                    let one: Counts = [(values.value(row).into(), 1)].into_iter().collect();
                    counts_json(&one).map(Some)
                } else {
                    Ok(None)
                }
            })
            .collect::<DfResult<StringArray>>()?;
        Ok(vec![Arc::new(states)])
    }

    fn size(&self) -> usize {
        self.bytes + self.groups.capacity() * std::mem::size_of::<Counts>()
    }
}

/// The one-group accumulator (used where DataFusion asks for one, e.g. without GROUP BY).
#[derive(Debug, Default)]
struct MostFrequent {
    counts: Counts,
    bytes: usize,
}

impl MostFrequent {
    fn add(&mut self, value: &str, n: u64) {
        match self.counts.get_mut(value) {
            Some(c) => *c += n,
            None => {
                self.bytes += value.len() + COUNT_OVERHEAD;
                self.counts.insert(value.into(), n);
            }
        }
    }
}

impl Accumulator for MostFrequent {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        let values = arrow::compute::cast(&values[0], &DataType::Utf8)?;
        for v in values.as_string::<i32>().iter().flatten() {
            self.add(v, 1);
        }
        Ok(())
    }

    fn evaluate(&mut self) -> DfResult<ScalarValue> {
        Ok(ScalarValue::Utf8(
            most_frequent_of(&self.counts).map(str::to_string),
        ))
    }

    fn size(&self) -> usize {
        std::mem::size_of::<Self>() + self.bytes
    }

    fn state(&mut self) -> DfResult<Vec<ScalarValue>> {
        Ok(vec![ScalarValue::Utf8(Some(counts_json(&self.counts)?))])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> DfResult<()> {
        let states = arrow::compute::cast(&states[0], &DataType::Utf8)?;
        for s in states.as_string::<i32>().iter().flatten() {
            for (value, n) in parse_counts(s)? {
                self.add(&value, n);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(values: &[Option<&str>]) -> ArrayRef {
        Arc::new(StringArray::from(values.to_vec()))
    }

    fn texts(array: &ArrayRef) -> Vec<Option<String>> {
        array
            .as_string::<i32>()
            .iter()
            .map(|v| v.map(str::to_string))
            .collect()
    }

    #[test]
    fn grouped_most_frequent_counts_per_group_and_breaks_ties_alphabetically() {
        let mut acc = MostFrequentGroups::default();
        let values = strings(&[
            Some("shoes"),
            Some("bags"),
            Some("bags"),
            None,
            Some("hats"),
            Some("caps"),
            Some("hats"),
            Some("zips"),
        ]);
        // Row 7 is filtered out, so group 2 has no value at all.
        let filter = BooleanArray::from(vec![true, true, true, true, true, true, true, false]);
        acc.update_batch(&[values], &[0, 0, 0, 0, 1, 1, 1, 2], Some(&filter), 3)
            .unwrap();
        // Another partition's partial state for group 1 makes caps and hats tie at 2.
        let mut other = MostFrequentGroups::default();
        other
            .update_batch(&[strings(&[Some("caps")])], &[0], None, 1)
            .unwrap();
        let state = other.state(EmitTo::All).unwrap();
        acc.merge_batch(&state, &[1], 3).unwrap();
        let skipped = acc
            .convert_to_state(&[strings(&[Some("a"), None])], None)
            .unwrap();
        assert_eq!(
            texts(&skipped[0]),
            vec![Some(r#"{"a":1}"#.to_string()), None]
        );
        assert!(acc.size() > 0);
        let first = acc.evaluate(EmitTo::First(1)).unwrap();
        assert_eq!(texts(&first), vec![Some("bags".to_string())]);
        let rest = acc.evaluate(EmitTo::All).unwrap();
        assert_eq!(texts(&rest), vec![Some("caps".to_string()), None]);
        assert_eq!(acc.size(), 0);
    }

    #[test]
    fn single_accumulator_merges_states() {
        let mut a = MostFrequent::default();
        a.update_batch(&[strings(&[Some("x"), Some("y"), Some("y")])])
            .unwrap();
        let mut b = MostFrequent::default();
        b.update_batch(&[strings(&[Some("x"), Some("x"), None])])
            .unwrap();
        let state = b.state().unwrap();
        let state = state[0].to_array().unwrap();
        a.merge_batch(&[state]).unwrap();
        assert_eq!(a.evaluate().unwrap(), ScalarValue::Utf8(Some("x".into())));
    }
}
