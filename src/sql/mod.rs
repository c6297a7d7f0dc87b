//! Tessera's DataFusion extensions: SQL functions, optimizer rules and JSON helpers. They know
//! nothing of a run's stages, so any context (a query, a run, later a cluster) can install
//! them; [`register`] is the one place that does.

pub mod cheap_filters_first;
pub mod file_chain;
pub mod first_touch;
pub mod functions;
pub mod funnel;
pub mod json_check;
pub mod json_skip;
pub mod plan_rules;
pub mod shift_window;
pub mod similarity;
pub mod window_args;

use std::sync::Arc;

use datafusion::execution::SessionStateBuilder;
use datafusion::prelude::SessionContext;

/// Adds Tessera's optimizer rules to a session being built.
pub fn add_rules(state: SessionStateBuilder) -> SessionStateBuilder {
    add_portable_rules(state).with_physical_optimizer_rule(Arc::new(shift_window::ShiftWindows))
}

/// The rules whose plans hold only DataFusion's own operators, so a plan can be sent to
/// another process (a cluster's executors) and read back there. `ShiftWindows` is left out:
/// its operator has no wire form, and without it the same windows run through DataFusion's
/// own operator, to the same rows.
pub fn add_portable_rules(state: SessionStateBuilder) -> SessionStateBuilder {
    state
        .with_optimizer_rule(Arc::new(window_args::WindowArgsAsColumns))
        .with_physical_optimizer_rule(Arc::new(cheap_filters_first::CheapFiltersFirst))
}

/// Registers every function Tessera adds to SQL on `ctx`: the JSON getters, `is_json`,
/// `most_frequent`, `funnel`, `jaro_winkler`, the sessions' first-touch reader and `as_of()` (set to now; a
/// run registers its own as-of over it).
pub fn register_functions(ctx: &mut SessionContext) -> datafusion::error::Result<()> {
    datafusion_functions_json::register_all(ctx)?;
    for udf in json_skip::udfs() {
        ctx.register_udf(udf);
    }
    ctx.register_udf(json_check::is_json_udf());
    ctx.register_udf(similarity::jaro_winkler_udf());
    ctx.register_udaf(functions::most_frequent());
    ctx.register_udaf(funnel::funnel());
    ctx.register_udf(first_touch::first_touch_udf());
    ctx.register_udf(functions::as_of(chrono::Utc::now()));
    Ok(())
}
