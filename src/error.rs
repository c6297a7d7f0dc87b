//! The one error type of the library: every failure names what is at fault and how to fix it.

use std::path::PathBuf;

use datafusion::error::DataFusionError;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in Tessera.
///
/// Context (file, key, table, location) lives in fields so callers can act on it; the
/// `Display` text is meant for a person and says how to fix the problem where we know.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `tessera.toml` is missing, unreadable, or does not match the config contract.
    #[error("{}: {message}", file.display())]
    Config {
        /// The config file at fault.
        file: PathBuf,
        /// The dotted key at fault, when there is one (e.g. `identity.identifiers[0].limit`).
        key: Option<String>,
        /// What is wrong and how to fix it.
        message: String,
    },

    /// A storage location (events, output, a source) cannot be used.
    #[error("{key} = \"{location}\": {message}")]
    Location {
        /// The config key the location came from, e.g. `storage.output`.
        key: String,
        /// The location as written (never carries credentials).
        location: String,
        /// What is wrong and how to fix it.
        message: String,
    },

    /// A local file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder at fault.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// An object store request failed.
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),

    /// A SQL file failed to parse, plan or run.
    #[error("{file}: {message}")]
    Query {
        /// The SQL file (or `<command line>` for `tessera query`).
        file: String,
        /// What went wrong, from DataFusion or from our own checks.
        message: String,
    },

    /// A Delta table could not be read or committed.
    #[error("table `{table}`: {source}")]
    Delta {
        /// The output table at fault.
        table: String,
        /// The error from delta-rs.
        #[source]
        source: Box<deltalake::DeltaTableError>,
    },

    /// An error from the query engine outside a user's SQL file.
    #[error("query engine: {0}")]
    DataFusion(DataFusionError),

    /// An Arrow error (casting, building batches).
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),

    /// A Parquet error while reading or writing a file we own.
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),

    /// A `TYPE:VALUE` identifier (of `tessera forget`) that cannot be read.
    #[error("{at}: {message}")]
    Identifier {
        /// Where it was given: `argument 2`, `people.txt line 4`.
        at: String,
        /// What is wrong and how to write it.
        message: String,
    },

    /// Another run holds the output's lease.
    #[error("locked: {0}")]
    Locked(String),

    /// This run lost its lease to another run and must not publish.
    #[error("fenced: {0}")]
    Fenced(String),

    /// Something else wrote where this run was publishing.
    #[error("conflict: {0}")]
    Conflict(String),

    /// A stage ran out of the memory it may use.
    #[error("{stage}: out of memory under the limit of {limit}: {message}. Raise --memory-limit (or run.memory_limit in tessera.toml){}, or give the machine more memory", .narrow.as_deref().map(|n| format!(", {n}")).unwrap_or_default())]
    Memory {
        /// The pipeline stage (for a segment, its name and file).
        stage: String,
        /// The limit in force, as written.
        limit: String,
        /// DataFusion's message.
        message: String,
        /// Another way out where the user's own query decides the size, e.g. "or narrow
        /// the segment".
        narrow: Option<String>,
    },

    /// A query ran past `run.query_timeout` and was stopped (with every task it started).
    #[error("{query}: still running after {limit}, the time limit of one query; it was stopped and this run published none of its tables. If it needs longer, raise run.query_timeout in tessera.toml (or pass --query-timeout); if it should not take this long, look for a query that never ends (a recursive CTE with no stop condition) or a join that multiplies rows{hint}")]
    QueryTimeout {
        /// The SQL file (e.g. `queries/segments/x.sql`), or which of Tessera's own stages.
        query: String,
        /// The limit in force, as written.
        limit: String,
        /// More to check, in a sentence starting with "; " (a run on a cluster names the
        /// executors), or empty.
        hint: String,
    },

    /// Event files whose scan gave other rows than their footers hold; a run skips them and
    /// tries again.
    #[error("{}", .0.iter().map(|f| format!("{}: {}", f.file, f.reason)).collect::<Vec<_>>().join("; "))]
    ShortScan(Vec<SkippedFile>),

    /// An export cannot be written as asked: where it would go, or personal data it would leave
    /// in clear. Nothing was written.
    #[error("export to {}: {message}", out.display())]
    Export {
        /// The file the export was to be written to, as given.
        out: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },

    /// A `[[sources]]` file that cannot be read as its format says (a ragged CSV row, bad
    /// quoting, text that is not UTF-8). The run stops: a broken file must not silently vanish.
    #[error("source `{source_name}`, {file} line {line}: {message}")]
    SourceFile {
        /// The `[[sources]]` table.
        source_name: String,
        /// The file, as its URL or path.
        file: String,
        /// The line (1-based) where the problem starts.
        line: u64,
        /// What is wrong and how to fix it.
        message: String,
    },

    /// The command line asked for something that cannot be done.
    #[error("{0}")]
    Usage(String),

    /// A table writer stopped before the event files were read to the end; the writer's own
    /// error says why.
    #[error("a table writer stopped before the event files were read")]
    WriterStopped,

    /// Not the input's, the config's or the SQL's fault: a task of Tessera's that stopped, a
    /// table it wrote that is not there. Run again; if it persists, it is a defect to report.
    #[error("internal error (not caused by your data or config; run again, and report it if it persists): {0}")]
    Internal(String),

    /// Data tests of severity `error` found rows breaking their rule: the run published
    /// nothing.
    #[error("data tests failed, so this run published nothing (the tables stay as the last run left them):\n  {failed}\nFix the data or the rule; a test whose failures should only be reported takes `-- severity: warn` (or severity = \"warn\" in tessera.toml)")]
    DataTest {
        /// One line per failed test: its name, how many rows break it, the first few.
        failed: String,
    },

    /// `tessera serve` cannot start or keep serving as asked.
    #[error("serve on {bind}: {message}")]
    Serve {
        /// The address it was to listen on, as given.
        bind: String,
        /// What went wrong and what to do.
        message: String,
    },

    /// A cluster's scheduler or executor could not be reached, started or used.
    #[error("cluster {address}: {message}")]
    Cluster {
        /// The scheduler's address (`df://HOST:PORT`), or the address a server was to bind.
        address: String,
        /// What went wrong and what to do.
        message: String,
    },
}

impl From<DataFusionError> for Error {
    /// The query engine's error; running out of the memory pool becomes [`Error::Memory`]
    /// (its stage and limit named by whoever catches it), whatever wraps it.
    fn from(e: DataFusionError) -> Self {
        if resources_exhausted(&e) {
            return Error::Memory {
                stage: String::new(),
                limit: String::new(),
                message: e.to_string(),
                narrow: None,
            };
        }
        Error::DataFusion(e)
    }
}

/// Whether `e`, or an error it wraps, is the memory pool refusing a reservation.
pub fn resources_exhausted(e: &DataFusionError) -> bool {
    matches!(e.find_root(), DataFusionError::ResourcesExhausted(_))
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A Delta error on `table`.
    ///
    /// delta-rs turns the query engine's errors into text (`DeltaTableError::Generic`), so the
    /// memory pool's refusal can only be recognised by DataFusion's own wording here, the one
    /// place it enters; everywhere else it is [`Error::Memory`].
    pub fn delta(table: impl Into<String>, source: deltalake::DeltaTableError) -> Self {
        let table = table.into();
        if let deltalake::DeltaTableError::Generic(text) = &source {
            if text.contains("Resources exhausted") {
                return Error::Memory {
                    stage: format!("table `{table}`"),
                    limit: String::new(),
                    message: text.clone(),
                    narrow: None,
                };
            }
        }
        Error::Delta {
            table,
            source: Box::new(source),
        }
    }

    /// A SQL error in `file`.
    pub fn query(file: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Error::Query {
            file: file.into(),
            message: message.to_string(),
        }
    }

    /// A query engine error in SQL file `file`: [`Error::Memory`] when the memory pool
    /// refused it, else [`Error::Query`].
    pub fn query_failed(file: impl Into<String>, e: DataFusionError) -> Self {
        let file = file.into();
        if resources_exhausted(&e) {
            return Error::Memory {
                stage: file,
                limit: String::new(),
                message: e.to_string(),
                narrow: None,
            };
        }
        Error::query(file, e)
    }

    /// Whether this is the memory pool refusing a reservation.
    pub fn is_memory(&self) -> bool {
        match self {
            Error::Memory { .. } => true,
            Error::DataFusion(e) => resources_exhausted(e),
            _ => false,
        }
    }

    /// The process exit code for this error; documented in README ("Exit codes").
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config { .. }
            | Error::Location { .. }
            | Error::Query { .. }
            | Error::Export { .. }
            | Error::Identifier { .. }
            | Error::Serve { .. }
            | Error::SourceFile { .. }
            | Error::Usage(_) => 2,
            Error::Locked(_) => 3,
            Error::Internal(_) => 4,
            _ => 1,
        }
    }
}

/// A file that was recorded and skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SkippedFile {
    /// The file's URL.
    pub file: String,
    /// Why it was skipped, and what to do about it.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_memory_is_told_by_the_error_not_its_text() {
        let refused = DataFusionError::ResourcesExhausted("pool".into());
        let wrapped = DataFusionError::Context("sorting".into(), Box::new(refused));
        assert!(matches!(Error::from(wrapped), Error::Memory { .. }));
        // A message that merely mentions it is not one.
        let other = DataFusionError::Plan("Resources exhausted is a phrase".into());
        assert!(!Error::from(other).is_memory());
        let failed = Error::query_failed(
            "queries/segments/x.sql",
            DataFusionError::ResourcesExhausted("pool".into()),
        );
        assert!(
            matches!(&failed, Error::Memory { stage, .. } if stage == "queries/segments/x.sql")
        );
        // delta-rs hands the engine's errors over as text: recognised where they enter.
        let delta = Error::delta(
            "sessions",
            deltalake::DeltaTableError::Generic(
                "Not enough memory to continue external sort.\ncaused by\nResources exhausted: Additional allocation failed".into(),
            ),
        );
        assert!(delta.is_memory());
    }

    #[test]
    fn failures_that_are_not_the_users_fault_have_their_own_exit_code() {
        assert_eq!(Error::Internal("a task stopped".into()).exit_code(), 4);
        assert_eq!(Error::Usage("bad flag".into()).exit_code(), 2);
        assert_ne!(Error::WriterStopped.exit_code(), 2);
    }
}
