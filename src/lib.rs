//! Tessera: an embedded customer data platform engine.
//!
//! Events land as Parquet files; DataFusion runs the SQL data engineers write; identity is
//! resolved in native Rust; results are Delta Lake tables BI tools read. Start at [`pipeline`].
//!
//! The modules are layered, and each imports only from the layers before it (a test in
//! `layers` fails on any import that points the other way, and on any cycle):
//!
//! 1. base: [`config`], [`digest`], [`storage`], [`tables`] (every table and column name), [`error`],
//!    [`faults`], [`metrics`], [`progress`], [`sources`] (CSV source tables);
//! 2. [`sql`]: the DataFusion extensions (functions, optimizer rules, JSON helpers), which
//!    know no stage;
//! 3. [`engine`] (the shared `SessionContext`) and, beside it, [`output`] (Delta writes,
//!    publish, lease, run state, scratch folders) and `cluster` (the Ballista scheduler,
//!    executors and driver context; cargo feature `cluster`);
//! 4. [`stages`]: one module per stage of a run, each taking its inputs and returning its
//!    tables;
//! 5. [`pipeline`]: the run as a graph of nodes, built and walked;
//! 6. [`cli`]: the commands.
#![warn(missing_docs)]

pub mod config;
pub mod digest;
pub mod error;
pub mod faults;
pub mod metrics;
pub mod progress;
pub mod sources;
pub mod storage;
pub mod tables;

pub mod sql;

#[cfg(feature = "cluster")]
pub mod cluster;
pub mod engine;
pub mod output;

pub mod stages;

pub mod pipeline;

pub mod cli;

#[cfg(test)]
mod layers;

pub use error::{Error, Result};
