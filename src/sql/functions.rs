//! SQL functions Tessera adds to DataFusion for traits and segments: `most_frequent(x)` and
//! `as_of()` (the run's as-of time, so relative windows are reproducible).

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, ListBuilder, StringArray, StringBuilder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, FieldRef};
use chrono::{DateTime, Utc};
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, EmitTo, GroupsAccumulator,
    ScalarUDF, Signature, Volatility,
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

    // Partial states travel as two lists per group: the values and their counts.
    fn state_fields(&self, args: StateFieldsArgs) -> DfResult<Vec<FieldRef>> {
        Ok(vec![
            Field::new_list(
                format_state_name(args.name, "values"),
                Field::new_list_field(DataType::Utf8, true),
                true,
            )
            .into(),
            Field::new_list(
                format_state_name(args.name, "counts"),
                Field::new_list_field(DataType::UInt64, true),
                true,
            )
            .into(),
        ])
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

/// One group's counts: (value id, count), ordered by value id.
type Counts = Vec<(u32, u64)>;

/// Distinct values, each stored once and named by its number.
#[derive(Debug, Default)]
struct Values {
    ids: std::collections::HashMap<Box<str>, u32, foldhash::fast::RandomState>,
    names: Vec<Box<str>>,
    bytes: usize,
}

impl Values {
    fn id(&mut self, value: &str) -> u32 {
        if let Some(&id) = self.ids.get(value) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.push(value.into());
        self.ids.insert(value.into(), id);
        self.bytes += 2 * (value.len() + VALUE_OVERHEAD);
        id
    }

    fn name(&self, id: u32) -> &str {
        &self.names[id as usize]
    }

    fn clear(&mut self) {
        *self = Values::default();
    }
}

/// Bytes a distinct value costs besides its text (twice: in the map and in the list): its
/// pointer and length, its number, the map's control byte and slack.
const VALUE_OVERHEAD: usize = 32;

/// Adds `n` to `value`'s count; returns whether the value is new to the group.
fn count(counts: &mut Counts, value: u32, n: u64) -> bool {
    match counts.binary_search_by_key(&value, |&(v, _)| v) {
        Ok(i) => {
            counts[i].1 += n;
            false
        }
        Err(i) => {
            counts.insert(i, (value, n));
            true
        }
    }
}

/// The most frequent value of `counts`, ties to the alphabetically first.
fn most_frequent_of<'a>(counts: &Counts, values: &'a Values) -> Option<&'a str> {
    counts
        .iter()
        .max_by(|a, b| {
            a.1.cmp(&b.1)
                .then_with(|| values.name(b.0).cmp(values.name(a.0)))
        })
        .map(|&(v, _)| values.name(v))
}

/// The state columns (values, counts) of `groups`.
fn state_lists<'a>(
    groups: impl Iterator<Item = Option<&'a Counts>>,
    values: &Values,
) -> Vec<ArrayRef> {
    let mut names = ListBuilder::new(StringBuilder::new());
    let mut counts = ListBuilder::new(UInt64Builder::new());
    for group in groups {
        match group {
            Some(group) => {
                for &(v, n) in group {
                    names.values().append_value(values.name(v));
                    counts.values().append_value(n);
                }
                names.append(true);
                counts.append(true);
            }
            None => {
                names.append(false);
                counts.append(false);
            }
        }
    }
    vec![Arc::new(names.finish()), Arc::new(counts.finish())]
}

/// Calls `each(row, value, count)` for every (value, count) pair of the state columns.
fn each_counted(states: &[ArrayRef], mut each: impl FnMut(usize, &str, u64)) -> DfResult<()> {
    let (names, counts) = (states[0].as_list::<i32>(), states[1].as_list::<i32>());
    if names.len() != counts.len() {
        return Err(DataFusionError::Internal(
            "most_frequent: states with as many value lists as count lists".into(),
        ));
    }
    let name_values = arrow::compute::cast(names.values(), &DataType::Utf8)?;
    let name_values = name_values.as_string::<i32>();
    let count_values = counts
        .values()
        .as_primitive::<arrow::datatypes::UInt64Type>();
    for row in 0..names.len() {
        if names.is_null(row) || counts.is_null(row) {
            continue;
        }
        let (a, b) = (names.value_offsets()[row], counts.value_offsets()[row]);
        let len = names.value_length(row);
        if len != counts.value_length(row) {
            return Err(DataFusionError::Internal(
                "most_frequent: a state with as many values as counts".into(),
            ));
        }
        for i in 0..len {
            let (v, c) = ((a + i) as usize, (b + i) as usize);
            if name_values.is_valid(v) {
                each(row, name_values.value(v), count_values.value(c));
            }
        }
    }
    Ok(())
}

#[derive(Debug, Default)]
struct MostFrequentGroups {
    values: Values,
    groups: Vec<Counts>,
    /// Bytes held by the groups' counts, kept up to date as values are added.
    bytes: usize,
}

impl MostFrequentGroups {
    fn add(&mut self, group: usize, value: &str, n: u64) {
        let id = self.values.id(value);
        if count(&mut self.groups[group], id, n) {
            self.bytes += std::mem::size_of::<(u32, u64)>();
        }
    }

    fn take(&mut self, emit_to: EmitTo) -> Vec<Counts> {
        let taken = emit_to.take_needed(&mut self.groups);
        let freed: usize =
            taken.iter().map(|c| c.len()).sum::<usize>() * std::mem::size_of::<(u32, u64)>();
        self.bytes = self.bytes.saturating_sub(freed);
        taken
    }

    /// Forgets the distinct values once no group is left to name them.
    fn tidy(&mut self) {
        if self.groups.is_empty() {
            self.values.clear();
            self.bytes = 0;
        }
    }
}

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
        let best: StringArray = groups
            .iter()
            .map(|c| most_frequent_of(c, &self.values))
            .collect();
        self.tidy();
        Ok(Arc::new(best))
    }

    fn state(&mut self, emit_to: EmitTo) -> DfResult<Vec<ArrayRef>> {
        let groups = self.take(emit_to);
        let state = state_lists(groups.iter().map(Some), &self.values);
        self.tidy();
        Ok(state)
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> DfResult<()> {
        self.groups.resize_with(total_num_groups, Counts::default);
        each_counted(values, |row, value, n| {
            self.add(group_indices[row], value, n)
        })
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> DfResult<Vec<ArrayRef>> {
        // Each row on its own: one value counted once, or no counts at all.
        let values = arrow::compute::cast(&values[0], &DataType::Utf8)?;
        let values = values.as_string::<i32>();
        let mut names = ListBuilder::new(StringBuilder::new());
        let mut counts = ListBuilder::new(UInt64Builder::new());
        for row in 0..values.len() {
            let counted = values.is_valid(row) && passes(opt_filter, row);
            if counted {
                names.values().append_value(values.value(row));
                counts.values().append_value(1);
            }
            names.append(counted);
            counts.append(counted);
        }
        Ok(vec![Arc::new(names.finish()), Arc::new(counts.finish())])
    }

    fn size(&self) -> usize {
        self.bytes + self.values.bytes + self.groups.capacity() * std::mem::size_of::<Counts>()
    }
}

/// The one-group accumulator (used where DataFusion asks for one, e.g. without GROUP BY).
#[derive(Debug, Default)]
struct MostFrequent {
    values: Values,
    counts: Counts,
}

impl Accumulator for MostFrequent {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        let values = arrow::compute::cast(&values[0], &DataType::Utf8)?;
        for v in values.as_string::<i32>().iter().flatten() {
            let id = self.values.id(v);
            count(&mut self.counts, id, 1);
        }
        Ok(())
    }

    fn evaluate(&mut self) -> DfResult<ScalarValue> {
        Ok(ScalarValue::Utf8(
            most_frequent_of(&self.counts, &self.values).map(str::to_string),
        ))
    }

    fn size(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.values.bytes
            + self.counts.len() * std::mem::size_of::<(u32, u64)>()
    }

    fn state(&mut self) -> DfResult<Vec<ScalarValue>> {
        state_lists(std::iter::once(Some(&self.counts)), &self.values)
            .iter()
            .map(|a| ScalarValue::try_from_array(a, 0))
            .collect()
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> DfResult<()> {
        let (values, counts) = (&mut self.values, &mut self.counts);
        each_counted(states, |_, value, n| {
            let id = values.id(value);
            count(counts, id, n);
        })
    }
}

/// The name `as_of()` is called by in SQL.
pub const AS_OF: &str = "as_of";

/// `as_of() -> timestamp`: the run's as-of time (`--as-of`, default the run's start).
pub fn as_of(at: DateTime<Utc>) -> ScalarUDF {
    ScalarUDF::new_from_impl(AsOf {
        micros: at.timestamp_micros(),
        signature: Signature::nullary(Volatility::Stable),
    })
}

/// The time an `as_of` function returns (microseconds since the epoch), read back so a plan
/// sent to another process can carry it; `None` for any other function.
pub fn as_of_micros(udf: &ScalarUDF) -> Option<i64> {
    udf.inner().downcast_ref::<AsOf>().map(|as_of| as_of.micros)
}

/// `as_of()`: a constant the run sets, kept as a value (not a closure) so it can be read back.
#[derive(Debug, PartialEq, Eq, Hash)]
struct AsOf {
    micros: i64,
    signature: Signature,
}

impl datafusion::logical_expr::ScalarUDFImpl for AsOf {
    fn name(&self) -> &str {
        AS_OF
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> DfResult<DataType> {
        Ok(crate::tables::timestamp_type())
    }

    fn invoke_with_args(
        &self,
        _args: datafusion::logical_expr::ScalarFunctionArgs,
    ) -> DfResult<ColumnarValue> {
        Ok(ColumnarValue::Scalar(ScalarValue::TimestampMicrosecond(
            Some(self.micros),
            Some("UTC".into()),
        )))
    }
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
        let kept: Vec<(usize, String, u64)> = {
            let mut kept = Vec::new();
            each_counted(&skipped, |row, v, n| kept.push((row, v.to_string(), n))).unwrap();
            kept
        };
        assert_eq!(kept, vec![(0, "a".to_string(), 1)]);
        assert!(skipped[0].is_null(1) && skipped[1].is_null(1));
        assert!(acc.size() > 0);
        let first = acc.evaluate(EmitTo::First(1)).unwrap();
        assert_eq!(texts(&first), vec![Some("bags".to_string())]);
        let rest = acc.evaluate(EmitTo::All).unwrap();
        assert_eq!(texts(&rest), vec![Some("caps".to_string()), None]);
        assert_eq!(acc.size(), 0);
    }

    #[test]
    fn grouped_most_frequent_agrees_with_counting_by_hand() {
        // Many values per group, arriving in no order, split over two accumulators.
        let mut state = 7u64;
        let mut next = move |n: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        let rows: Vec<(usize, String)> = (0..2000)
            .map(|_| {
                let group = next(5) as usize;
                // Skewed so that counts differ and some tie.
                let v = next(60).min(next(60));
                (group, format!("v{v:02}"))
            })
            .collect();
        let (left, right) = rows.split_at(900);
        let mut accs = Vec::new();
        for part in [left, right] {
            let mut acc = MostFrequentGroups::default();
            let values: Vec<Option<&str>> = part.iter().map(|(_, v)| Some(v.as_str())).collect();
            let groups: Vec<usize> = part.iter().map(|(g, _)| *g).collect();
            acc.update_batch(&[strings(&values)], &groups, None, 5)
                .unwrap();
            accs.push(acc);
        }
        let state = accs[1].state(EmitTo::All).unwrap();
        accs[0].merge_batch(&state, &[0, 1, 2, 3, 4], 5).unwrap();
        let got = texts(&accs[0].evaluate(EmitTo::All).unwrap());
        for (g, got) in got.iter().enumerate() {
            let mut counts: std::collections::BTreeMap<&str, u64> = Default::default();
            for (_, v) in rows.iter().filter(|(group, _)| *group == g) {
                *counts.entry(v).or_default() += 1;
            }
            let best = counts.values().max().unwrap();
            let want = counts
                .iter()
                .find(|(_, n)| *n == best)
                .map(|(v, _)| v.to_string());
            assert_eq!(got, &want, "group {g}");
        }
    }

    #[test]
    fn single_accumulator_merges_states() {
        let mut a = MostFrequent::default();
        a.update_batch(&[strings(&[Some("x"), Some("y"), Some("y")])])
            .unwrap();
        let mut b = MostFrequent::default();
        b.update_batch(&[strings(&[Some("x"), Some("x"), None])])
            .unwrap();
        let state: Vec<ArrayRef> = b
            .state()
            .unwrap()
            .iter()
            .map(|s| s.to_array().unwrap())
            .collect();
        a.merge_batch(&state).unwrap();
        assert_eq!(a.evaluate().unwrap(), ScalarValue::Utf8(Some("x".into())));
    }
}
