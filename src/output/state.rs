//! What earlier runs processed, kept under `<output>/_state/` as Delta tables that are
//! published together with the run's output tables (so state and output never disagree):
//!
//! - `_state/input_files`: one row per event file processed (URL, size, ETag, rows, run).
//! - `_state/events`: the event history: every event that passed the checks, one row per
//!   message_id, in plain types. An incremental run appends only the new files' events and
//!   reads the history from here instead of re-reading and re-checking every input file.

use std::collections::HashMap;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Int64Type};
use datafusion::prelude::SessionContext;

use crate::error::Result;
use crate::output::Outputs;

/// The table of processed input files.
pub const INPUT_FILES: &str = crate::tables::state::INPUT_FILES;
/// The event history.
pub const EVENTS: &str = crate::tables::state::EVENTS;

/// What an earlier run recorded about one input file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenFile {
    /// Size in bytes when processed.
    pub size: u64,
    /// ETag when processed, if the store gave one.
    pub e_tag: Option<String>,
    /// The run that processed it.
    pub run_id: String,
}

/// Processed files by URL.
pub type Seen = HashMap<String, SeenFile>;

/// The files earlier runs processed, as published; `None` when no run has recorded any.
pub async fn seen(outputs: &Outputs, ctx: &SessionContext) -> Result<Option<Seen>> {
    let Some(df) = outputs.read(ctx, INPUT_FILES).await? else {
        return Ok(None);
    };
    let mut seen = Seen::new();
    for batch in df.collect().await? {
        let text = |name: &str| {
            batch
                .column_by_name(name)
                .map(|c| arrow::compute::cast(c, &DataType::Utf8))
                .transpose()
        };
        let (Some(file), Some(e_tag), Some(run)) = (text("file")?, text("e_tag")?, text("run_id")?)
        else {
            continue;
        };
        let size = arrow::compute::cast(
            batch.column_by_name("size").expect("input_files has size"),
            &DataType::Int64,
        )?;
        let (file, e_tag, run) = (
            file.as_string::<i32>(),
            e_tag.as_string::<i32>(),
            run.as_string::<i32>(),
        );
        let size = size.as_primitive::<Int64Type>();
        for i in 0..batch.num_rows() {
            seen.insert(
                file.value(i).to_string(),
                SeenFile {
                    size: size.value(i) as u64,
                    e_tag: (!e_tag.is_null(i)).then(|| e_tag.value(i).to_string()),
                    run_id: run.value(i).to_string(),
                },
            );
        }
    }
    Ok(Some(seen))
}
