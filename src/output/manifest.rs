//! Current-files manifests for readers without Delta Lake: beside its `_delta_log/`, each
//! output table gets `_symlink_format_manifest/manifest`, a text file naming the Parquet files
//! of its published version, one absolute path or URL a line (the layout Delta Lake's
//! "symlink format manifest" gives Presto and Athena). Reading every `*.parquet` of a table
//! folder instead returns each version a run wrote, so a table replaced five times shows its
//! rows five times; the manifest names only the current ones.
//!
//! Manifests change in the same publish as the tables they list ([`Stage::replace_on_publish`]):
//! a run that stops before publishing leaves the old manifest naming the old files, which the
//! retention keeps on disk. A retired table's manifest is deleted by the run that retires it.

use object_store::path::Path;
use object_store::ObjectStoreExt;

use crate::error::{Error, Result};
use crate::output::publish::Stage;
use crate::output::Outputs;
use crate::storage::Location;

/// The manifest's folder inside a table's folder.
pub const DIR: &str = "_symlink_format_manifest";
/// The manifest's file name.
pub const FILE: &str = "manifest";

/// Where table `name`'s manifest lives.
pub fn path(outputs: &Outputs, name: &str) -> Path {
    outputs.place().child(name).join(DIR).join(FILE)
}

/// Whether table `name` gets a manifest: every output table, not Tessera's own state.
pub fn wanted(name: &str) -> bool {
    !name.starts_with("_state/")
}

/// The manifest of table `name` at its current version in `outputs` (the run's staged view):
/// one file a line, sorted; `None` when the table does not exist.
pub async fn text(outputs: &Outputs, name: &str) -> Result<Option<String>> {
    let Some(table) = outputs.open(name).await? else {
        return Ok(None);
    };
    let local = matches!(outputs.place().location, Location::Local(_));
    let mut files = Vec::new();
    for uri in table.get_file_uris().map_err(|e| Error::delta(name, e))? {
        // A local path is written as a path: DuckDB, pandas and Spark all read those.
        let line = match url::Url::parse(&uri) {
            Ok(url) if local && url.scheme() == "file" => url
                .to_file_path()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or(uri),
            _ => uri,
        };
        files.push(line);
    }
    files.sort();
    let mut body = files.join("\n");
    body.push('\n');
    Ok(Some(body))
}

/// Stages the manifests a publish changes: those of `written` (tables given a new version by
/// this publish, read through `staged`), of `carried` tables that have none yet in `real`, and
/// the deletion of `retired` tables' manifests.
pub async fn stage(
    stage: &Stage,
    staged: &Outputs,
    real: &Outputs,
    written: &[String],
    carried: &[String],
    retired: &[String],
) -> Result<()> {
    for name in written.iter().filter(|n| wanted(n)) {
        if let Some(body) = text(staged, name).await? {
            stage.replace_on_publish(&path(real, name), body);
        }
    }
    for name in carried.iter().filter(|n| wanted(n)) {
        let at = path(real, name);
        match real.place().store.head(&at).await {
            Ok(_) => continue,
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(body) = text(staged, name).await? {
            stage.replace_on_publish(&at, body);
        }
    }
    for name in retired.iter().filter(|n| wanted(n)) {
        stage.delete_on_publish(&path(real, name));
    }
    Ok(())
}
