//! Reports: `queries/reports/<name>.sql` → `reports.<name>` for later SQL and
//! `<output>/reports/<name>` for BI tools.
//!
//! A report is any read-only query over the run's tables: funnel conversion, top paths,
//! revenue by RFM segment. Reports run after segments, in file-name order, so a report can
//! read every table of the run and the reports before it.
//!
//! A Delta table keeps no row order (its writer may interleave the query's partitions, and
//! readers scan files in parallel), so a report's `ORDER BY` is kept as a column: each table
//! gets [`ORDER_COLUMN`], the row's place (1, 2, …) in the query's result. `tessera query`
//! and the HTML report read `reports.<name>` sorted by it and without it; other readers
//! `ORDER BY report_row`.

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::output::{Committed, Outputs};
use crate::tables;

/// The column holding each report row's place in its query's result.
pub const ORDER_COLUMN: &str = tables::REPORT_ORDER;

/// One report file.
#[derive(Debug, Clone)]
pub struct ReportQuery {
    /// The report's name: the file name without `.sql`.
    pub name: String,
    /// The file, relative to the project.
    pub file: String,
    /// Its SQL.
    pub sql: String,
}

/// The project's reports, in file-name order.
pub fn list(engine: &Engine) -> Result<Vec<ReportQuery>> {
    engine
        .project
        .query_files(tables::REPORTS)?
        .into_iter()
        .map(|q| {
            let name = q
                .path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            if !crate::config::is_sql_name(&name) {
                return Err(Error::query(&q.file, format!("`{name}` is not a usable report name: name the file with lowercase letters, digits and _ (e.g. checkout_funnel.sql)")));
            }
            crate::engine::check_read_only(&engine.ctx, &q.sql, &q.file)?;
            Ok(ReportQuery {
                name,
                file: q.file,
                sql: q.sql,
            })
        })
        .collect()
}

/// Runs one report, writes it to `reports/<name>` and registers it as `reports.<name>`.
pub async fn materialise(
    engine: &Engine,
    outputs: &Outputs,
    report: &ReportQuery,
) -> Result<(String, Committed)> {
    let table = format!("{}/{}", tables::REPORTS, report.name);
    let df = engine.query(&report.sql, &report.file).await?;
    if df.schema().has_column_with_unqualified_name(ORDER_COLUMN) {
        return Err(Error::query(
            &report.file,
            format!("the report returns a column named `{ORDER_COLUMN}`, which Tessera adds to keep the rows' order; rename it"),
        ));
    }
    let schema = std::sync::Arc::new(df.schema().as_arrow().clone());
    // A query's result stream is in its ORDER BY order; the rows are numbered as they come.
    let (mut batches, held) = engine
        .collect_reserved(df, &report.file, format!("report {}", report.name))
        .await?;
    if batches.is_empty() {
        batches.push(arrow::array::RecordBatch::new_empty(schema));
    }
    let mut numbered = Vec::with_capacity(batches.len());
    let mut next = 1i64;
    for batch in batches {
        let rows = batch.num_rows() as i64;
        let order: arrow::array::ArrayRef = std::sync::Arc::new(
            arrow::array::Int64Array::from_iter_values(next..next + rows),
        );
        next += rows;
        let mut fields: Vec<arrow::datatypes::FieldRef> =
            batch.schema().fields().iter().cloned().collect();
        fields.push(std::sync::Arc::new(arrow::datatypes::Field::new(
            ORDER_COLUMN,
            arrow::datatypes::DataType::Int64,
            false,
        )));
        let mut columns = batch.columns().to_vec();
        columns.push(order);
        numbered.push(arrow::array::RecordBatch::try_new(
            std::sync::Arc::new(arrow::datatypes::Schema::new(fields)),
            columns,
        )?);
    }
    let df = engine.ctx.read_batches(numbered)?;
    let reference =
        datafusion::common::TableReference::partial(tables::REPORTS, report.name.as_str());
    let committed = outputs
        .write_registered(&engine.ctx, &table, reference.clone(), df)
        .await
        .map_err(|e| Error::query(&report.file, e))?;
    // Later reports read this one as `tessera query` shows it: in order, without the column.
    let provider = engine.ctx.table_provider(reference.clone()).await?;
    engine.ctx.deregister_table(reference.clone())?;
    engine.ctx.register_table(
        reference,
        crate::engine::in_report_order(&engine.ctx, provider)?,
    )?;
    drop(held);
    Ok((table, committed))
}
