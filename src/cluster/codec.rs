//! How Tessera's functions travel in plans sent between a cluster's processes.
//!
//! Ballista moves a function by its name; the receiving process takes the function of that
//! name from its own registry. That is right for every Tessera function but one: `as_of()`
//! carries the run's as-of time, and the scheduler's or an executor's own `as_of` holds the
//! time that process started. These codecs wrap Ballista's and write `as_of`'s time into the
//! plan (8 bytes, microseconds since the epoch), so every process evaluates the driver's
//! value; everything else is left to Ballista's codecs.

use std::sync::Arc;

use ballista_core::serde::{BallistaLogicalExtensionCodec, BallistaPhysicalExtensionCodec};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::{Result, TableReference};
use datafusion::datasource::file_format::FileFormatFactory;
use datafusion::datasource::TableProvider;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{AggregateUDF, Extension, LogicalPlan, ScalarUDF, WindowUDF};
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};

use crate::sql::functions::AS_OF;

/// `as_of`'s time as the plan carries it, or nothing for any other function.
fn encode_as_of(node: &ScalarUDF, buf: &mut Vec<u8>) -> bool {
    if node.name() != AS_OF {
        return false;
    }
    match crate::sql::functions::as_of_micros(node) {
        Some(micros) => {
            buf.extend_from_slice(&micros.to_le_bytes());
            true
        }
        None => false,
    }
}

/// The `as_of` a plan carries, rebuilt with its time.
fn decode_as_of(name: &str, buf: &[u8]) -> Option<Arc<ScalarUDF>> {
    if name != AS_OF {
        return None;
    }
    let micros = i64::from_le_bytes(buf.try_into().ok()?);
    let at = chrono::DateTime::from_timestamp_micros(micros)?;
    Some(Arc::new(crate::sql::functions::as_of(at)))
}

/// Ballista's logical codec, with `as_of`'s time carried in the plan.
#[derive(Debug, Default)]
pub struct LogicalCodec {
    inner: BallistaLogicalExtensionCodec,
}

impl LogicalExtensionCodec for LogicalCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[LogicalPlan],
        ctx: &TaskContext,
    ) -> Result<Extension> {
        self.inner.try_decode(buf, inputs, ctx)
    }

    fn try_encode(&self, node: &Extension, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.try_encode(node, buf)
    }

    fn try_decode_table_provider(
        &self,
        buf: &[u8],
        table_ref: &TableReference,
        schema: SchemaRef,
        ctx: &TaskContext,
    ) -> Result<Arc<dyn TableProvider>> {
        self.inner
            .try_decode_table_provider(buf, table_ref, schema, ctx)
    }

    fn try_encode_table_provider(
        &self,
        table_ref: &TableReference,
        node: Arc<dyn TableProvider>,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        self.inner.try_encode_table_provider(table_ref, node, buf)
    }

    fn try_decode_file_format(
        &self,
        buf: &[u8],
        ctx: &TaskContext,
    ) -> Result<Arc<dyn FileFormatFactory>> {
        self.inner.try_decode_file_format(buf, ctx)
    }

    fn try_encode_file_format(
        &self,
        buf: &mut Vec<u8>,
        node: Arc<dyn FileFormatFactory>,
    ) -> Result<()> {
        self.inner.try_encode_file_format(buf, node)
    }

    fn try_decode_udf(&self, name: &str, buf: &[u8]) -> Result<Arc<ScalarUDF>> {
        match decode_as_of(name, buf) {
            Some(udf) => Ok(udf),
            None => self.inner.try_decode_udf(name, buf),
        }
    }

    fn try_encode_udf(&self, node: &ScalarUDF, buf: &mut Vec<u8>) -> Result<()> {
        if encode_as_of(node, buf) {
            return Ok(());
        }
        self.inner.try_encode_udf(node, buf)
    }

    fn try_decode_udaf(&self, name: &str, buf: &[u8]) -> Result<Arc<AggregateUDF>> {
        self.inner.try_decode_udaf(name, buf)
    }

    fn try_encode_udaf(&self, node: &AggregateUDF, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.try_encode_udaf(node, buf)
    }

    fn try_decode_udwf(&self, name: &str, buf: &[u8]) -> Result<Arc<WindowUDF>> {
        self.inner.try_decode_udwf(name, buf)
    }

    fn try_encode_udwf(&self, node: &WindowUDF, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.try_encode_udwf(node, buf)
    }
}

/// Ballista's physical codec, with `as_of`'s time carried in the plan.
#[derive(Debug, Default)]
pub struct PhysicalCodec {
    inner: BallistaPhysicalExtensionCodec,
}

impl PhysicalExtensionCodec for PhysicalCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.inner.try_decode(buf, inputs, ctx, proto_converter)
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        self.inner.try_encode(node, buf, proto_converter)
    }

    fn try_decode_udf(&self, name: &str, buf: &[u8]) -> Result<Arc<ScalarUDF>> {
        match decode_as_of(name, buf) {
            Some(udf) => Ok(udf),
            None => self.inner.try_decode_udf(name, buf),
        }
    }

    fn try_encode_udf(&self, node: &ScalarUDF, buf: &mut Vec<u8>) -> Result<()> {
        if encode_as_of(node, buf) {
            return Ok(());
        }
        self.inner.try_encode_udf(node, buf)
    }

    fn try_decode_udaf(&self, name: &str, buf: &[u8]) -> Result<Arc<AggregateUDF>> {
        self.inner.try_decode_udaf(name, buf)
    }

    fn try_encode_udaf(&self, node: &AggregateUDF, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.try_encode_udaf(node, buf)
    }

    fn try_decode_udwf(&self, name: &str, buf: &[u8]) -> Result<Arc<WindowUDF>> {
        self.inner.try_decode_udwf(name, buf)
    }

    fn try_encode_udwf(&self, node: &WindowUDF, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.try_encode_udwf(node, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as_of_keeps_its_time_across_the_wire() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-03-01T12:34:56.789Z")
            .expect("a time")
            .to_utc();
        let sent = crate::sql::functions::as_of(at);
        let mut buf = Vec::new();
        LogicalCodec::default()
            .try_encode_udf(&sent, &mut buf)
            .expect("encodes");
        let got = LogicalCodec::default()
            .try_decode_udf(AS_OF, &buf)
            .expect("decodes");
        assert_eq!(
            crate::sql::functions::as_of_micros(&got),
            Some(at.timestamp_micros())
        );
        let mut buf = Vec::new();
        PhysicalCodec::default()
            .try_encode_udf(&sent, &mut buf)
            .expect("encodes");
        let got = PhysicalCodec::default()
            .try_decode_udf(AS_OF, &buf)
            .expect("decodes");
        assert_eq!(
            crate::sql::functions::as_of_micros(&got),
            Some(at.timestamp_micros())
        );
    }
}
