//! Integration tests: the real binary on real files, a real S3 server and real readers.
//! One test binary, so DataFusion is linked once.

mod cli;
#[cfg(feature = "cluster")]
mod cluster;
mod common;
mod crm;
mod export;
mod faults;
mod forget;
mod formats;
mod generator;
mod generator_knobs;
mod graph;
mod identity;
mod identity_groups;
mod identity_props;
mod identity_rounds;
mod incremental;
mod ingest;
mod journeys;
mod limits;
mod matching;
mod profiles;
mod readers;
mod reliability;
mod report;
mod s3;
mod serve;
mod slt;
mod trust;
mod validate;
