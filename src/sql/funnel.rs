//! `funnel(window, timestamp, step_1, step_2, …)`: how far a group's events went through an
//! ordered series of steps, each within `window` of the step before.
//!
//! ```sql
//! SELECT profile_id,
//!        funnel(INTERVAL '7 days', "timestamp",
//!               event = 'Product Viewed', event = 'Product Added',
//!               event = 'Checkout Started', event = 'Order Completed') AS furthest_step
//! FROM events GROUP BY profile_id
//! ```
//!
//! The result is the number of steps reached (0 when step 1 never happened). Step k counts at
//! an event matching it at or after a time step k−1 was reached, and no later than `window`
//! after it. Events are taken in time order whatever order they arrive in; one event advances
//! the funnel by at most one step. For each step the latest time it was reached is kept:
//! a later step k−1 leaves the most room for step k, so this finds the furthest reachable step.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int32Array, ListArray};
use arrow::datatypes::{DataType, Field, FieldRef, Int64Type, IntervalUnit, TimeUnit};
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature, Volatility,
};
use datafusion::physical_expr::expressions::Literal;

/// The most steps one funnel may have (a step is one bit of a 64-bit mask).
pub const MAX_STEPS: usize = 63;

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// The `funnel` aggregate function.
pub fn funnel() -> AggregateUDF {
    AggregateUDF::new_from_impl(FunnelUdaf {
        signature: Signature::user_defined(Volatility::Immutable),
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct FunnelUdaf {
    signature: Signature,
}

fn plan_error(message: String) -> DataFusionError {
    DataFusionError::Plan(format!(
        "funnel: {message}. Write funnel(INTERVAL '7 days', \"timestamp\", <step 1 condition>, <step 2 condition>, …)"
    ))
}

impl AggregateUDFImpl for FunnelUdaf {
    fn name(&self) -> &str {
        "funnel"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> DfResult<Vec<DataType>> {
        if args.len() < 3 {
            return Err(plan_error(format!(
                "needs a window, a timestamp and at least one step, got {} arguments",
                args.len()
            )));
        }
        if args.len() - 2 > MAX_STEPS {
            return Err(plan_error(format!(
                "{} steps is more than the {MAX_STEPS} a funnel can have",
                args.len() - 2
            )));
        }
        let window = match &args[0] {
            DataType::Interval(_) | DataType::Null => {
                DataType::Interval(IntervalUnit::MonthDayNano)
            }
            other => {
                return Err(plan_error(format!(
                    "the first argument is the window between steps, an INTERVAL, not {other}"
                )))
            }
        };
        let time = match &args[1] {
            DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64 | DataType::Null => {
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
            }
            other => {
                return Err(plan_error(format!(
                    "the second argument is the event time, a timestamp, not {other}"
                )))
            }
        };
        let mut out = vec![window, time];
        for (i, arg) in args[2..].iter().enumerate() {
            match arg {
                DataType::Boolean | DataType::Null => out.push(DataType::Boolean),
                other => {
                    return Err(plan_error(format!(
                        "step {} must be a condition (true/false), not {other}",
                        i + 1
                    )))
                }
            }
        }
        Ok(out)
    }

    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Int32)
    }

    fn accumulator(&self, args: AccumulatorArgs) -> DfResult<Box<dyn Accumulator>> {
        Ok(Box::new(FunnelAccumulator {
            window: window_of(&args)?,
            steps: args.exprs.len().saturating_sub(2),
            events: Vec::new(),
        }))
    }

    fn groups_accumulator_supported(&self, _: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> DfResult<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(FunnelGroups {
            window: window_of(&args)?,
            steps: args.exprs.len().saturating_sub(2),
            groups: Vec::new(),
            events: 0,
        }))
    }

    // Partial states: the matching events' times and step masks, as two lists.
    fn state_fields(&self, args: StateFieldsArgs) -> DfResult<Vec<FieldRef>> {
        let list = DataType::List(Arc::new(Field::new_list_field(DataType::Int64, true)));
        Ok(vec![
            Field::new(format_state_name(args.name, "times"), list.clone(), true).into(),
            Field::new(format_state_name(args.name, "steps"), list, true).into(),
        ])
    }
}

/// The window between steps, in microseconds, from the constant first argument.
fn window_of(args: &AccumulatorArgs) -> DfResult<i64> {
    let window = args
        .exprs
        .first()
        .and_then(|e| e.downcast_ref::<Literal>())
        .map(|l| l.value().clone())
        .ok_or_else(|| plan_error("the window must be a constant INTERVAL".into()))?;
    let window = match window {
        ScalarValue::IntervalMonthDayNano(Some(v)) => {
            // A month counts as 30 days: funnels measure elapsed time, not calendar dates.
            (v.months as i64 * 30 + v.days as i64) * MICROS_PER_DAY + v.nanoseconds / 1000
        }
        ScalarValue::IntervalDayTime(Some(v)) => {
            v.days as i64 * MICROS_PER_DAY + v.milliseconds as i64 * 1000
        }
        ScalarValue::IntervalYearMonth(Some(v)) => v as i64 * 30 * MICROS_PER_DAY,
        other => {
            return Err(plan_error(format!(
                "the window must be a constant, non-NULL INTERVAL, not {other}"
            )))
        }
    };
    if window < 0 {
        return Err(plan_error("the window must not be negative".into()));
    }
    Ok(window)
}

#[derive(Debug)]
struct FunnelAccumulator {
    /// The longest time allowed between two consecutive steps, in microseconds.
    window: i64,
    steps: usize,
    /// (time, mask of the steps the event matches), for events matching at least one step.
    events: Vec<(i64, u64)>,
}

/// Steps reached by `events` (sorted here), each within `window` of the step before.
fn furthest(events: &mut [(i64, u64)], steps: usize, window: i64) -> i32 {
    events.sort_unstable();
    let mut reached: Vec<Option<i64>> = vec![None; steps];
    for &(time, mask) in events.iter() {
        // From the last step down, so one event cannot complete two steps at once.
        for k in (0..steps).rev() {
            if mask & (1 << k) == 0 {
                continue;
            }
            if k == 0 {
                reached[0] = Some(time);
            } else if let Some(before) = reached[k - 1] {
                if time - before <= window {
                    reached[k] = Some(time);
                }
            }
        }
    }
    reached
        .iter()
        .rposition(Option::is_some)
        .map_or(0, |k| k as i32 + 1)
}

impl FunnelAccumulator {
    fn furthest(&mut self) -> i32 {
        furthest(&mut self.events, self.steps, self.window)
    }
}

/// The events of one batch that match a step: (row, time, mask).
fn matching(values: &[ArrayRef]) -> DfResult<Vec<(usize, i64, u64)>> {
    let times = arrow::compute::cast(
        &values[1],
        &DataType::Timestamp(TimeUnit::Microsecond, None),
    )?;
    let times = times.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
    let steps: Vec<&arrow::array::BooleanArray> =
        values[2..].iter().map(|a| a.as_boolean()).collect();
    let mut out = Vec::new();
    for row in 0..times.len() {
        if times.is_null(row) {
            continue;
        }
        let mut mask = 0u64;
        for (k, step) in steps.iter().enumerate() {
            if step.is_valid(row) && step.value(row) {
                mask |= 1 << k;
            }
        }
        if mask != 0 {
            out.push((row, times.value(row), mask));
        }
    }
    Ok(out)
}

/// Partial states as two list arrays (times, masks), one row per group.
fn state_arrays<'a>(groups: impl Iterator<Item = &'a Vec<(i64, u64)>> + Clone) -> Vec<ArrayRef> {
    let times = ListArray::from_iter_primitive::<Int64Type, _, _>(
        groups
            .clone()
            .map(|g| Some(g.iter().map(|e| Some(e.0)).collect::<Vec<_>>())),
    );
    let masks = ListArray::from_iter_primitive::<Int64Type, _, _>(
        groups.map(|g| Some(g.iter().map(|e| Some(e.1 as i64)).collect::<Vec<_>>())),
    );
    vec![Arc::new(times), Arc::new(masks)]
}

/// Calls `add(row, time, mask)` for every event in partial-state lists.
fn each_state_event(states: &[ArrayRef], mut add: impl FnMut(usize, i64, u64)) {
    let times = states[0].as_list::<i32>();
    let masks = states[1].as_list::<i32>();
    for row in 0..times.len() {
        if times.is_null(row) || masks.is_null(row) {
            continue;
        }
        let t = times.value(row);
        let m = masks.value(row);
        let t = t.as_primitive::<Int64Type>();
        let m = m.as_primitive::<Int64Type>();
        for (&t, &m) in t.values().iter().zip(m.values().iter()) {
            add(row, t, m as u64);
        }
    }
}

/// `funnel` for GROUP BY: one object holds every group's matching events.
#[derive(Debug)]
struct FunnelGroups {
    window: i64,
    steps: usize,
    groups: Vec<Vec<(i64, u64)>>,
    events: usize,
}

impl GroupsAccumulator for FunnelGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> DfResult<()> {
        self.groups.resize_with(total_num_groups, Vec::new);
        for (row, time, mask) in matching(values)? {
            if opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row)) {
                self.groups[group_indices[row]].push((time, mask));
                self.events += 1;
            }
        }
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> DfResult<ArrayRef> {
        let mut groups = emit_to.take_needed(&mut self.groups);
        self.events -= groups.iter().map(Vec::len).sum::<usize>();
        let out: Int32Array = groups
            .iter_mut()
            .map(|g| Some(furthest(g, self.steps, self.window)))
            .collect();
        Ok(Arc::new(out))
    }

    fn state(&mut self, emit_to: EmitTo) -> DfResult<Vec<ArrayRef>> {
        let groups = emit_to.take_needed(&mut self.groups);
        self.events -= groups.iter().map(Vec::len).sum::<usize>();
        Ok(state_arrays(groups.iter()))
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> DfResult<()> {
        self.groups.resize_with(total_num_groups, Vec::new);
        let groups = &mut self.groups;
        let mut added = 0;
        each_state_event(values, |row, t, m| {
            groups[group_indices[row]].push((t, m));
            added += 1;
        });
        self.events += added;
        Ok(())
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> DfResult<Vec<ArrayRef>> {
        let mut rows: Vec<Vec<(i64, u64)>> = vec![Vec::new(); values[1].len()];
        for (row, time, mask) in matching(values)? {
            if opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row)) {
                rows[row].push((time, mask));
            }
        }
        Ok(state_arrays(rows.iter()))
    }

    fn size(&self) -> usize {
        self.events * std::mem::size_of::<(i64, u64)>()
            + self.groups.capacity() * std::mem::size_of::<Vec<(i64, u64)>>()
    }
}

fn list_of(values: impl IntoIterator<Item = i64>) -> ScalarValue {
    let list = ListArray::from_iter_primitive::<Int64Type, _, _>([Some(
        values.into_iter().map(Some).collect::<Vec<_>>(),
    )]);
    ScalarValue::List(Arc::new(list))
}

impl Accumulator for FunnelAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        self.events
            .extend(matching(values)?.into_iter().map(|(_, t, m)| (t, m)));
        Ok(())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> DfResult<()> {
        let events = &mut self.events;
        each_state_event(states, |_, t, m| events.push((t, m)));
        Ok(())
    }

    fn state(&mut self) -> DfResult<Vec<ScalarValue>> {
        Ok(vec![
            list_of(self.events.iter().map(|e| e.0)),
            list_of(self.events.iter().map(|e| e.1 as i64)),
        ])
    }

    fn evaluate(&mut self) -> DfResult<ScalarValue> {
        Ok(ScalarValue::Int32(Some(self.furthest())))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.events.capacity() * std::mem::size_of::<(i64, u64)>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acc(window_days: i64, steps: usize, events: &[(i64, u64)]) -> FunnelAccumulator {
        FunnelAccumulator {
            window: window_days * MICROS_PER_DAY,
            steps,
            events: events.to_vec(),
        }
    }

    const DAY: i64 = MICROS_PER_DAY;

    #[test]
    fn steps_count_only_in_order_and_within_the_window() {
        // view, add a day later, checkout 8 days after the add: outside a 7-day window.
        let mut f = acc(7, 3, &[(0, 0b001), (DAY, 0b010), (9 * DAY, 0b100)]);
        assert_eq!(f.furthest(), 2);
        // The same with the checkout exactly 7 days after: inside (the window is inclusive).
        let mut f = acc(7, 3, &[(0, 0b001), (DAY, 0b010), (8 * DAY, 0b100)]);
        assert_eq!(f.furthest(), 3);
        // An add before any view does not count.
        let mut f = acc(7, 3, &[(0, 0b010), (DAY, 0b001)]);
        assert_eq!(f.furthest(), 1);
        // Nothing matching step 1: zero.
        let mut f = acc(7, 3, &[(0, 0b010), (DAY, 0b100)]);
        assert_eq!(f.furthest(), 0);
    }

    #[test]
    fn arrival_order_does_not_matter_and_a_later_start_can_finish() {
        // Views at day 0 and day 20, add at day 21: the second view opens the funnel.
        let mut f = acc(7, 2, &[(21 * DAY, 0b10), (20 * DAY, 0b01), (0, 0b01)]);
        assert_eq!(f.furthest(), 2);
    }

    #[test]
    fn one_event_advances_at_most_one_step() {
        // An event matching steps 1 and 2 at once opens the funnel but does not also pass step 2.
        let mut f = acc(7, 2, &[(0, 0b11)]);
        assert_eq!(f.furthest(), 1);
        // A second such event passes step 2 (the first one reached step 1).
        let mut f = acc(7, 2, &[(0, 0b11), (DAY, 0b11)]);
        assert_eq!(f.furthest(), 2);
    }

    #[test]
    fn partial_states_merge() {
        let mut a = acc(7, 2, &[(0, 0b01)]);
        let mut b = acc(7, 2, &[(2 * DAY, 0b10)]);
        let states: Vec<ArrayRef> = b
            .state()
            .unwrap()
            .into_iter()
            .map(|s| s.to_array().unwrap())
            .collect();
        a.merge_batch(&states).unwrap();
        assert_eq!(a.furthest(), 2);
    }
}
