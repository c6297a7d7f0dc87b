//! Tessera: an embedded customer data platform engine.
//!
//! Events land as Parquet files; DataFusion runs the SQL data engineers write; identity is
//! resolved in native Rust; results are Delta Lake tables BI tools read. Start at [`pipeline`].
#![warn(missing_docs)]

pub mod bench;
pub mod cheap_filters_first;
pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod export;
pub mod faults;
pub mod file_chain;
pub mod forget;
pub mod functions;
pub mod funnel;
pub mod generate;
pub mod identity;
pub mod incremental_traits;
pub mod ingest;
pub mod journeys;
pub mod json_check;
pub mod json_skip;
pub mod lease;
pub mod metrics;
pub mod output;
pub mod pipeline;
pub mod plan_rules;
pub mod predict;
pub mod profiles;
pub mod progress;
pub mod publish;
pub mod reports;
pub mod runs;
pub mod scratch;
pub mod segments;
pub mod session_cut;
pub mod shift_window;
pub mod state;
pub mod status;
pub mod storage;
pub mod tables;
pub mod window_args;

pub use error::{Error, Result};
