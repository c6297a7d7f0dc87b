//! Reports: `queries/reports/<name>.sql` → `reports.<name>` for later SQL and
//! `<output>/reports/<name>` for BI tools.
//!
//! A report is any read-only query over the run's tables: funnel conversion, top paths,
//! revenue by RFM segment. Reports run after segments, in file-name order, so a report can
//! read every table of the run and the reports before it.

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::output::{Committed, Outputs};
use crate::tables;

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
    let reference =
        datafusion::common::TableReference::partial(tables::REPORTS, report.name.as_str());
    let committed = outputs
        .write_registered(&engine.ctx, &table, reference, df)
        .await
        .map_err(|e| Error::query(&report.file, e))?;
    Ok((table, committed))
}
