//! The stages of a run, one module each. A stage takes its inputs (tables registered on the
//! engine's context, or handed over) and returns its tables and what it did; it never
//! decides whether it runs: [`crate::pipeline`] does.

pub mod forget;
pub mod formats;
pub mod identity;
pub mod incremental_segments;
pub mod incremental_traits;
pub mod ingest;
pub mod journeys;
pub mod predict;
pub mod profiles;
pub mod reports;
pub mod segments;
pub mod windows;
