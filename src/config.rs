//! `tessera.toml` → a typed [`Config`], with errors that name the file and the key at fault.
//!
//! Every key has a default, so a file holding only `[storage]` is a complete project. Unknown
//! keys are refused rather than ignored: a misspelt `limt = 1` that silently did nothing would
//! merge profiles the user meant to keep apart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The name of a project's config file.
pub const CONFIG_FILE: &str = "tessera.toml";

/// A project's whole configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[project]`
    #[serde(default)]
    pub project: ProjectConfig,
    /// `[storage]`
    #[serde(default)]
    pub storage: StorageConfig,
    /// `[[sources]]`: extra tables registered under their name.
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// `[identity]`
    #[serde(default)]
    pub identity: IdentityConfig,
    /// `[profiles]`
    #[serde(default)]
    pub profiles: ProfilesConfig,
    /// `[run]`: memory, spilling, the lease and how long old table versions are kept.
    #[serde(default)]
    pub run: RunConfig,
    /// `[sessions]`: how events are cut into visits.
    #[serde(default)]
    pub sessions: SessionsConfig,
    /// `[predictions]`: purchases, RFM and the lifetime-value models.
    #[serde(default)]
    pub predictions: PredictionsConfig,
    /// `[export]`: what `tessera export --hash-pii` does to each column.
    #[serde(default)]
    pub export: ExportConfig,
    /// `[[tests]]`: declared checks on the run's tables (docs/data-tests.md).
    #[serde(default)]
    pub tests: Vec<DeclaredTest>,
    /// `[audits]`: the identity graph's built-in checks (docs/data-tests.md).
    #[serde(default)]
    pub audits: AuditsConfig,
    /// `[report]`: the HTML run report written after each `tessera run` (docs/report.md).
    #[serde(default)]
    pub report: ReportConfig,
    /// `[warnings]`: when a run warns about its as-of and its segments (docs/report.md).
    #[serde(default)]
    pub warnings: WarningsConfig,
    /// `[[exports]]`: segment exports written with every run (CRM import files and others).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exports: Vec<ExportSpec>,
    /// The top-level sections the file wrote out (`sessions`, `predictions`, …), defaults
    /// or not: a built-in table is computed when its section is present or a query reads it.
    #[serde(skip)]
    pub declared: std::collections::BTreeSet<String>,
}

/// What a failing data test does to the run.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// The run fails and publishes nothing.
    #[default]
    Error,
    /// The run publishes; the summary and the JSON report list the failure.
    Warn,
}

impl Severity {
    /// `error` or `warn`, as written in config.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warn => "warn",
        }
    }
}

/// One `[[tests]]` entry: checks on one column of one table, each compiled to a query
/// returning the rows that break it.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeclaredTest {
    /// The table, as SQL names it (`profiles`, `segments.high_value`).
    pub table: String,
    /// The column checked.
    pub column: String,
    /// No two rows share a value.
    #[serde(default)]
    pub unique: bool,
    /// No row has it null.
    #[serde(default)]
    pub not_null: bool,
    /// Every non-null value is one of these.
    #[serde(default)]
    pub accepted_values: Option<Vec<String>>,
    /// Every non-null value is found in another table's column.
    #[serde(default)]
    pub relationships: Option<Relationship>,
    /// What a failure does (default `error`).
    #[serde(default)]
    pub severity: Severity,
}

/// `relationships = { to = "profiles", field = "profile_id" }`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Relationship {
    /// The table the values must be found in.
    pub to: String,
    /// Its column.
    pub field: String,
}

/// `[audits]`: checks of the identity graph after each run that resolves it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditsConfig {
    /// Run the audits at all.
    pub enabled: bool,
    /// No profile holds more identifiers (of all types) than this; unset: not checked.
    pub max_profile_size: Option<u64>,
    /// What a failed audit does.
    pub severity: Severity,
}

impl Default for AuditsConfig {
    fn default() -> Self {
        AuditsConfig {
            enabled: true,
            max_profile_size: None,
            severity: Severity::Error,
        }
    }
}

/// `[report]`: the section's presence turns the report on after every run.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReportConfig {
    /// `false` keeps the section without writing the report after runs.
    pub enabled: bool,
    /// Where to write it: a local file, relative to the project folder; default
    /// `report.html` at the top of `storage.output` (on S3 too).
    pub path: Option<String>,
    /// How many of the last runs the charts over time show.
    pub runs: usize,
}

impl Default for ReportConfig {
    fn default() -> Self {
        ReportConfig {
            enabled: true,
            path: None,
            runs: 30,
        }
    }
}

/// `[warnings]`: thresholds of the warnings a run gives.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WarningsConfig {
    /// Warn when the as-of is more than this many days after the newest event.
    pub as_of_gap_days: u32,
    /// Warn when a segment's size changes by more than this percentage in one run.
    pub segment_change_percent: f64,
}

impl Default for WarningsConfig {
    fn default() -> Self {
        WarningsConfig {
            as_of_gap_days: 7,
            segment_change_percent: 50.0,
        }
    }
}

/// `[sessions]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// A new session starts when a profile has been inactive for longer than this.
    pub gap_minutes: u32,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig { gap_minutes: 30 }
    }
}

/// `[predictions]`: which events are purchases and how the models measure time and value.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PredictionsConfig {
    /// The track event name of a purchase (`event` column).
    pub purchase_event: String,
    /// The purchase property holding its value (a number in `properties`).
    pub revenue: String,
    /// The time unit the models are fitted in: `days` or `weeks`.
    pub time_unit: TimeUnit,
    /// Lifetime value is predicted over this many months (of 30 days).
    pub clv_months: u32,
    /// Monthly discount rate of future value in the lifetime value (0.01 = 1% a month).
    pub discount_rate: f64,
}

impl Default for PredictionsConfig {
    fn default() -> Self {
        PredictionsConfig {
            purchase_event: "Order Completed".into(),
            revenue: "revenue".into(),
            time_unit: TimeUnit::Weeks,
            clv_months: 12,
            discount_rate: 0.01,
        }
    }
}

/// The unit of `recency`, `age` and the models' rate parameters.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TimeUnit {
    /// Days.
    Days,
    /// Weeks (7 days), as in the BG/NBD literature.
    Weeks,
}

impl TimeUnit {
    /// Days in one unit.
    pub fn days(self) -> f64 {
        match self {
            TimeUnit::Days => 1.0,
            TimeUnit::Weeks => 7.0,
        }
    }

    /// The unit's name as written in `tessera.toml`.
    pub fn name(self) -> &'static str {
        match self {
            TimeUnit::Days => "days",
            TimeUnit::Weeks => "weeks",
        }
    }
}

/// `[project]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    /// A name for logs and the `runs` table.
    #[serde(default = "default_project_name")]
    pub name: String,
}

impl Default for ProjectConfig {
    fn default() -> Self {
        ProjectConfig {
            name: default_project_name(),
        }
    }
}

fn default_project_name() -> String {
    "tessera".to_string()
}

/// `[storage]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Where event Parquet files land: a folder, `file://`, `s3://bucket/prefix` or `memory://`.
    #[serde(default = "default_events")]
    pub events: String,
    /// Where output tables are written.
    #[serde(default = "default_output")]
    pub output: String,
    /// How the files under `events` are laid out: which producer wrote them
    /// (see `docs/formats.md`).
    #[serde(default, skip_serializing_if = "EventFormat::is_segment")]
    pub events_format: EventFormat,
    /// `[storage.retry]`: how S3 requests are retried and timed out.
    #[serde(default)]
    pub retry: RetryConfig,
}

/// `[storage.retry]`: retries with exponential backoff and jitter, and request timeouts.
///
/// object_store retries 5xx (503 SlowDown included), 429 and dropped connections for every
/// request, and timeouts for reads; Tessera itself retries the writes it makes conditionally
/// (lease, publish) after a timeout, checking whether the first attempt landed.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Retries per request before giving up.
    pub max_retries: usize,
    /// No retry starts later than this after the first attempt (keep it under 5 minutes:
    /// retries reuse the request's signature).
    pub retry_timeout_secs: u64,
    /// The first backoff; each retry doubles it, up to `max_backoff_ms`.
    pub initial_backoff_ms: u64,
    /// The longest wait between two attempts.
    pub max_backoff_ms: u64,
    /// A request that has not completed after this long fails (and may be retried).
    pub request_timeout_secs: u64,
    /// Connecting to the server fails after this long.
    pub connect_timeout_secs: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_retries: 10,
            retry_timeout_secs: 180,
            initial_backoff_ms: 100,
            max_backoff_ms: 15_000,
            request_timeout_secs: 30,
            connect_timeout_secs: 5,
        }
    }
}

/// `[run]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Memory the query engine may use, e.g. `"4GiB"`, `"512MiB"`, or `"60%"` of this
    /// machine's memory (the default). `--memory-limit` overrides it.
    pub memory_limit: String,
    /// Where large sorts and aggregations spill; default: the system's temporary folder.
    pub spill_dir: Option<String>,
    /// Most disk spilling may use, e.g. `"100GiB"`.
    pub max_spill: String,
    /// How long a lease lasts without renewal; a run renews it every third of this.
    pub lease_seconds: u64,
    /// Files of old table versions (and leftovers of dead runs) are deleted once older than this.
    pub retention_hours: u64,
    /// Longest one query of a run may take, e.g. `"30m"`, `"90s"`, `"2h"` (see [`parse_duration`]).
    pub query_timeout: String,
    /// A cluster scheduler (`df://HOST:PORT`) to run on; default: this machine alone.
    /// `--cluster` overrides it. See docs/cluster.md.
    pub cluster: Option<String>,
    /// Above this many distinct identity links, connected components are found by rounds of
    /// SQL (on the cluster when there is one) instead of the union-find in this process's
    /// memory; see docs/cluster.md. Default: unset, always the union-find.
    pub cluster_identity_above: Option<u64>,
    /// How many partitions each query sent to a cluster is split into: the tasks of each of
    /// its stages. Default: this machine's cores, as for a local run. Set it to the task slots
    /// of all executors together (`--tasks` summed) so that every executor gets work.
    pub cluster_partitions: Option<usize>,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            memory_limit: "60%".into(),
            spill_dir: None,
            max_spill: "100GiB".into(),
            lease_seconds: 300,
            retention_hours: 168,
            query_timeout: "30m".into(),
            cluster: None,
            cluster_identity_above: None,
            cluster_partitions: None,
        }
    }
}

/// Parses a size such as `4GiB`, `512MiB`, `2GB`, `1048576`, or `60%` of `total` bytes.
pub fn parse_size(text: &str, total: u64) -> Option<u64> {
    let text = text.trim();
    if let Some(share) = text.strip_suffix('%') {
        let share: f64 = share.trim().parse().ok()?;
        if !(share > 0.0 && share <= 100.0) {
            return None;
        }
        return Some((total as f64 * share / 100.0) as u64);
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        _ => return None,
    };
    let bytes = number * scale as f64;
    (bytes >= 1.0).then_some(bytes as u64)
}

/// The longest `run.query_timeout` accepted: a query meant to run longer than a week is a
/// mistake in the value, not a plan.
pub const MAX_QUERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Parses a time limit such as `90s`, `30m`, `2h` or `600` (seconds), from 1 second up to
/// [`MAX_QUERY_TIMEOUT`]; anything else (zero, negative, fractions, other units) is `None`.
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "s" | "sec" | "secs" | "second" | "seconds" => 1,
        "m" | "min" | "mins" | "minute" | "minutes" => 60,
        "h" | "hour" | "hours" => 3600,
        _ => return None,
    };
    let limit = std::time::Duration::from_secs(number.checked_mul(scale)?);
    (!limit.is_zero() && limit <= MAX_QUERY_TIMEOUT).then_some(limit)
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            events: default_events(),
            output: default_output(),
            events_format: EventFormat::default(),
            retry: RetryConfig::default(),
        }
    }
}

fn default_events() -> String {
    "data/events".to_string()
}

fn default_output() -> String {
    "out".to_string()
}

/// One `[[sources]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The table name SQL sees.
    pub name: String,
    /// A Parquet file or folder; with `format = "csv"` a CSV file or folder; a Delta table
    /// for `snowplow`.
    pub location: String,
    /// How its files are laid out. `parquet` and `csv`: a plain table for SQL. An event
    /// format also maps its rows to events, which join the event history.
    // Left out of the serialised config when default, so a run's recorded config of a source
    // (what decides recomputing) is the same as before these keys existed.
    #[serde(default, skip_serializing_if = "SourceFormat::is_parquet")]
    pub format: SourceFormat,
    /// `[sources.csv]`: delimiter, quote and header of CSV files.
    #[serde(default, skip_serializing_if = "is_default")]
    pub csv: CsvOptions,
    /// `[sources.crm]`: the table holds CRM contacts that take part in identity and traits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crm: Option<CrmSource>,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// A producer's event layout: how its files map onto Tessera's event columns
/// (`docs/formats.md` has each mapping).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum EventFormat {
    /// Segment-spec Parquet: Tessera's own columns, JSON text in traits/properties/context.
    #[default]
    Segment,
    /// RudderStack's object-storage data lake (one folder per table, flattened columns).
    Rudderstack,
    /// Segment Data Lakes (`segment_type=…/day=…/hr=…`, flattened columns).
    SegmentDatalake,
    /// The Snowplow lake loader's Delta table.
    Snowplow,
}

impl EventFormat {
    fn is_segment(&self) -> bool {
        *self == EventFormat::Segment
    }

    /// The name as written in `tessera.toml`.
    pub fn name(self) -> &'static str {
        match self {
            EventFormat::Segment => "segment",
            EventFormat::Rudderstack => "rudderstack",
            EventFormat::SegmentDatalake => "segment_datalake",
            EventFormat::Snowplow => "snowplow",
        }
    }
}

/// `[[sources]] format`: a plain table, or one of the event formats.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    /// A plain Parquet table that SQL reads.
    #[default]
    Parquet,
    /// A plain table of CSV text files (`[sources.csv]`).
    Csv,
    /// Segment-spec event Parquet.
    Segment,
    /// RudderStack's object-storage data lake.
    Rudderstack,
    /// Segment Data Lakes.
    SegmentDatalake,
    /// The Snowplow lake loader's Delta table.
    Snowplow,
}

impl SourceFormat {
    /// The event format whose rows join the event history; `None` for a plain table.
    pub fn events(self) -> Option<EventFormat> {
        match self {
            SourceFormat::Parquet | SourceFormat::Csv => None,
            SourceFormat::Segment => Some(EventFormat::Segment),
            SourceFormat::Rudderstack => Some(EventFormat::Rudderstack),
            SourceFormat::SegmentDatalake => Some(EventFormat::SegmentDatalake),
            SourceFormat::Snowplow => Some(EventFormat::Snowplow),
        }
    }

    fn is_parquet(&self) -> bool {
        *self == SourceFormat::Parquet
    }
}

/// `[sources.csv]`: how a CSV source is written.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CsvOptions {
    /// The field delimiter: one ASCII character (`"\t"` for tab).
    pub delimiter: String,
    /// The quote character: one ASCII character.
    pub quote: String,
    /// Whether the first line names the columns (else they are `column_1`, `column_2`, …).
    pub header: bool,
}

impl Default for CsvOptions {
    fn default() -> Self {
        CsvOptions {
            delimiter: ",".into(),
            quote: "\"".into(),
            header: true,
        }
    }
}

/// The CRM a contacts export comes from: it sets the default column names.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CrmSystem {
    /// Salesforce Contact (field API names: `Id`, `Email`, `LastModifiedDate`, …).
    Salesforce,
    /// HubSpot contacts (internal property names: `hs_object_id`, `email`, `lastmodifieddate`, …).
    Hubspot,
}

/// `[sources.crm]`: a table of CRM contacts. Every key but `system` defaults to the CRM's own
/// column names.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CrmSource {
    /// Which CRM exported the contacts.
    pub system: CrmSystem,
    /// The identifier type of `[identity]` the contact id becomes (`salesforce_id`, `hubspot_id`).
    #[serde(default)]
    pub identifier: Option<String>,
    /// The column holding the contact id.
    #[serde(default)]
    pub id_column: Option<String>,
    /// The column holding the email address (empty: none).
    #[serde(default)]
    pub email_column: Option<String>,
    /// The column holding the phone number (empty: none).
    #[serde(default)]
    pub phone_column: Option<String>,
    /// The column holding when the contact was last modified.
    #[serde(default)]
    pub modified_column: Option<String>,
    /// Profile trait column → contact column (default: first and last name and the account).
    #[serde(default)]
    pub traits: Option<BTreeMap<String, String>>,
}

/// `name` quoted as an SQL identifier.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl CrmSource {
    /// The identity query of a contacts table `table`: one row per contact linking its id to
    /// its email and phone (those that are identifier types), seen when it was last modified.
    pub fn identity_sql(&self, table: &str, identifiers: &[&str]) -> String {
        let text = |c: &str| format!("CAST({} AS VARCHAR)", quoted(c));
        let mut columns = vec![format!(
            "{} AS {}",
            text(&self.id_column()),
            quoted(&self.identifier())
        )];
        for (column, kind) in [
            (self.email_column(), "email"),
            (self.phone_column(), "phone"),
        ] {
            if let Some(column) = column.filter(|_| identifiers.contains(&kind)) {
                columns.push(format!("{} AS {kind}", text(&column)));
            }
        }
        columns.push(format!(
            "CAST({} AS TIMESTAMP) AS seen_at",
            quoted(&self.modified_column())
        ));
        format!(
            "-- Contacts of [[sources]] {table}: each links its CRM id to its email and phone.\nSELECT {}\nFROM {table}",
            columns.join(", ")
        )
    }

    /// The trait query of a contacts table `table`: per profile and per field, the value of the
    /// most recently modified contact that has one (ties: the greater contact id), and when
    /// the latest of its contacts was modified (`crm_modified_at`).
    pub fn traits_sql(&self, table: &str) -> String {
        let id = format!("CAST(c.{} AS VARCHAR)", quoted(&self.id_column()));
        let modified = format!("CAST(c.{} AS TIMESTAMP)", quoted(&self.modified_column()));
        let mut columns = vec!["g.profile_id".to_string()];
        for (name, column) in self.traits() {
            let value = format!("CAST(c.{} AS VARCHAR)", quoted(&column));
            columns.push(format!(
                "first_value({value} ORDER BY {modified} DESC NULLS LAST, {id} DESC) FILTER (WHERE trim({value}) <> '') AS {}",
                quoted(&name)
            ));
        }
        columns.push(format!("max({modified}) AS crm_modified_at"));
        format!(
            "-- Fields of [[sources]] {table} onto profiles: most recent LastModifiedDate wins, field by field.\nSELECT {}\nFROM {table} c\nJOIN identity_graph g ON g.identifier_type = '{}' AND g.identifier_value = trim({id})\nGROUP BY g.profile_id",
            columns.join(",\n       "),
            self.identifier().replace('\'', "''"),
        )
    }

    /// The identifier type the contact id becomes.
    pub fn identifier(&self) -> String {
        self.identifier
            .clone()
            .unwrap_or_else(|| match self.system {
                CrmSystem::Salesforce => "salesforce_id".into(),
                CrmSystem::Hubspot => "hubspot_id".into(),
            })
    }

    fn column(&self, set: &Option<String>, salesforce: &str, hubspot: &str) -> Option<String> {
        let name = set.clone().unwrap_or_else(|| {
            match self.system {
                CrmSystem::Salesforce => salesforce,
                CrmSystem::Hubspot => hubspot,
            }
            .to_string()
        });
        (!name.is_empty()).then_some(name)
    }

    /// The contact id column.
    pub fn id_column(&self) -> String {
        self.column(&self.id_column, "Id", "hs_object_id")
            .unwrap_or_else(|| "Id".into())
    }

    /// The email column, if any.
    pub fn email_column(&self) -> Option<String> {
        self.column(&self.email_column, "Email", "email")
    }

    /// The phone column, if any.
    pub fn phone_column(&self) -> Option<String> {
        self.column(&self.phone_column, "Phone", "phone")
    }

    /// The last-modified column.
    pub fn modified_column(&self) -> String {
        self.column(
            &self.modified_column,
            "LastModifiedDate",
            "lastmodifieddate",
        )
        .unwrap_or_else(|| "LastModifiedDate".into())
    }

    /// Profile trait column → contact column.
    pub fn traits(&self) -> BTreeMap<String, String> {
        self.traits.clone().unwrap_or_else(|| {
            let pairs: &[(&str, &str)] = match self.system {
                CrmSystem::Salesforce => &[
                    ("first_name", "FirstName"),
                    ("last_name", "LastName"),
                    ("account_id", "AccountId"),
                ],
                CrmSystem::Hubspot => &[
                    ("first_name", "firstname"),
                    ("last_name", "lastname"),
                    ("company", "company"),
                ],
            };
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
    }
}

/// Where an `[[exports]]` entry goes.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExportTarget {
    /// Salesforce Bulk API 2.0 ingest CSV.
    Salesforce,
    /// HubSpot imports API CSV, with its import request JSON.
    Hubspot,
    /// Plain CSV.
    Csv,
    /// Parquet.
    Parquet,
}

/// One `[[exports]]` entry: a segment written for a destination with every run.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExportSpec {
    /// Names the export and its folder (`<output>/exports/<name>/<run_id>/`).
    pub name: String,
    /// The segment exported.
    pub segment: String,
    /// The destination's file layout.
    pub target: ExportTarget,
    /// Destination column → Tessera column (of the segment or `profiles`); default: the
    /// target's standard contact columns.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// The destination column holding `profile_id`, the key an upsert matches on (default
    /// `Tessera_Profile_Id__c` for Salesforce, `tessera_profile_id` for HubSpot).
    #[serde(default)]
    pub external_id: Option<String>,
    /// CSV field delimiter: `,` (default), `;`, `|`, `\t`, `^` or `` ` ``.
    #[serde(default)]
    pub delimiter: Option<String>,
    /// A file is cut before it would grow past this many bytes (default: the target's limit).
    #[serde(default)]
    pub max_file_bytes: Option<u64>,
    /// Apply `--hash-pii` (identifiers and names hashed, other personal data left out).
    #[serde(default)]
    pub hash_pii: bool,
    /// Also write the members who entered (`add`) and left (`remove`) in the run.
    #[serde(default)]
    pub changes: bool,
}

/// One ASCII character of a CSV option (`"\t"` written as a backslash and `t` is a tab too).
pub fn csv_char(value: &str) -> Option<u8> {
    match value {
        "\\t" => Some(b'\t'),
        v if v.len() == 1 && v.is_ascii() && v != "\n" && v != "\r" => v.bytes().next(),
        _ => None,
    }
}

/// `[identity]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Identifier types, highest priority first.
    #[serde(default = "default_identifiers")]
    pub identifiers: Vec<IdentifierConfig>,
    /// Country calling code used to complete phone numbers written without one (e.g. `"1"`, `"44"`).
    #[serde(default = "default_country_code")]
    pub default_country_code: String,
    /// `[[identity.probabilistic]]`: records linked by Fellegi-Sunter matching (see
    /// `docs/matching.md`). Empty: identity is deterministic only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probabilistic: Vec<ProbabilisticConfig>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            identifiers: default_identifiers(),
            default_country_code: default_country_code(),
            probabilistic: Vec::new(),
        }
    }
}

fn default_country_code() -> String {
    "1".to_string()
}

/// One `[[identity.probabilistic]]` block: a record source, how to pair its records, how to
/// compare them, and the match probability above which a pair links.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProbabilisticConfig {
    /// Names the block in `match_model`, `match_scores` and `identity_links.query`.
    pub name: String,
    /// A `[[sources]]` table holding the records (or use `query`).
    #[serde(default)]
    pub source: Option<String>,
    /// An SQL file under `queries/identity/` returning the records (or use `source`).
    #[serde(default)]
    pub query: Option<String>,
    /// The column that identifies a record.
    pub record_id: String,
    /// Columns that carry identifiers: column name → identifier type of `[identity]`.
    pub identifiers: BTreeMap<String, String>,
    /// SQL join conditions over `l` and `r`; a pair is a candidate when any of them holds.
    pub blocking: Vec<String>,
    /// How pairs are compared.
    pub comparisons: Vec<ComparisonConfig>,
    /// Pairs with at least this match probability link.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Pairs with at least this probability get a `match_scores` row.
    #[serde(default = "default_report_floor")]
    pub report_floor: f64,
    /// Seeds the random pairs u is estimated from.
    #[serde(default)]
    pub seed: u64,
    /// How many random pairs estimate u.
    #[serde(default = "default_u_pairs")]
    pub u_pairs: u64,
    /// Most EM iterations for m.
    #[serde(default = "default_em_iterations")]
    pub max_iterations: u32,
    /// A fixed share of candidate pairs that match, instead of the EM estimate.
    #[serde(default)]
    pub prior: Option<f64>,
    /// Most candidate pairs the blocking rules may produce: a rule too loose to be useful
    /// stops the run with an error naming it, instead of exhausting memory.
    #[serde(default = "default_max_pairs")]
    pub max_pairs: u64,
    /// Between trainings, a run scores only new and changed records (against all records)
    /// with the model it kept. The model is trained again, and every pair scored again, once
    /// the records have grown by this share since it was trained (1.0: doubled). 0 trains and
    /// scores everything on every run.
    #[serde(default = "default_retrain_after_growth")]
    pub retrain_after_growth: f64,
}

fn default_retrain_after_growth() -> f64 {
    1.0
}

fn default_max_pairs() -> u64 {
    100_000_000
}

fn default_threshold() -> f64 {
    0.5
}
fn default_report_floor() -> f64 {
    0.01
}
fn default_u_pairs() -> u64 {
    1_000_000
}
fn default_em_iterations() -> u32 {
    50
}

/// One comparison of a probabilistic block: a column and its levels, best first.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ComparisonConfig {
    /// The record column compared.
    pub column: String,
    /// Levels, best first: `exact`, `jaro_winkler >= 0.92`, `levenshtein <= 2`,
    /// `days <= 30`, `swapped_day_month`; `else` is added when missing.
    pub levels: Vec<String>,
    /// Weigh exact agreement on common values less (a common surname).
    #[serde(default)]
    pub term_frequency: bool,
    /// Fixed m per level (else included) instead of the EM estimate.
    #[serde(default)]
    pub m: Option<Vec<f64>>,
    /// Fixed u per level (else included) instead of the random-pair estimate.
    #[serde(default)]
    pub u: Option<Vec<f64>>,
}

/// A comparison level, parsed from its text in `levels`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MatchLevel {
    /// Equal text.
    Exact,
    /// Jaro-Winkler similarity at least this.
    JaroWinkler(f64),
    /// Levenshtein distance at most this.
    Levenshtein(usize),
    /// Both dates, at most this many days apart.
    Days(i64),
    /// Both dates, equal once day and month of one are swapped.
    SwappedDayMonth,
    /// Anything else.
    Else,
}

impl MatchLevel {
    /// Parses `exact`, `jaro_winkler >= 0.9`, `levenshtein <= 2`, `days <= 30`,
    /// `swapped_day_month` or `else`.
    pub fn parse(text: &str) -> std::result::Result<MatchLevel, String> {
        let t = text.trim().to_ascii_lowercase();
        let words: Vec<&str> = t.split_whitespace().collect();
        let bad = || {
            format!("\"{text}\" is not a level: write exact, \"jaro_winkler >= 0.92\", \"levenshtein <= 2\", \"days <= 30\", swapped_day_month or else")
        };
        match words.as_slice() {
            ["exact"] => Ok(MatchLevel::Exact),
            ["else"] => Ok(MatchLevel::Else),
            ["swapped_day_month"] => Ok(MatchLevel::SwappedDayMonth),
            ["jaro_winkler", ">=", x] => match x.parse::<f64>() {
                Ok(v) if (0.0..=1.0).contains(&v) => Ok(MatchLevel::JaroWinkler(v)),
                _ => Err(format!("{}: the similarity must be between 0 and 1", bad())),
            },
            ["levenshtein", "<=", x] => x.parse().map(MatchLevel::Levenshtein).map_err(|_| bad()),
            ["days", "<=", x] => match x.parse::<i64>() {
                Ok(v) if v >= 0 => Ok(MatchLevel::Days(v)),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }

    /// The level as written in `match_model` and `match_scores`.
    pub fn label(&self) -> String {
        match self {
            MatchLevel::Exact => "exact".into(),
            MatchLevel::JaroWinkler(x) => format!("jaro_winkler >= {x}"),
            MatchLevel::Levenshtein(n) => format!("levenshtein <= {n}"),
            MatchLevel::Days(n) => format!("days <= {n}"),
            MatchLevel::SwappedDayMonth => "swapped_day_month".into(),
            MatchLevel::Else => "else".into(),
        }
    }
}

impl ComparisonConfig {
    /// The levels, parsed, ending with `else`.
    pub fn parsed_levels(&self) -> std::result::Result<Vec<MatchLevel>, (usize, String)> {
        let mut out = Vec::with_capacity(self.levels.len() + 1);
        for (i, text) in self.levels.iter().enumerate() {
            let level = MatchLevel::parse(text).map_err(|e| (i, e))?;
            if level == MatchLevel::Else && i + 1 != self.levels.len() {
                return Err((i, "else must be the last level".into()));
            }
            out.push(level);
        }
        if out.last() != Some(&MatchLevel::Else) {
            out.push(MatchLevel::Else);
        }
        Ok(out)
    }
}

/// The Segment-spec identifiers: user_id (one per profile), email, anonymous_id.
fn default_identifiers() -> Vec<IdentifierConfig> {
    vec![
        IdentifierConfig {
            limit: Some(1),
            ..IdentifierConfig::named("user_id")
        },
        IdentifierConfig {
            normalize: Normalize::Email,
            ..IdentifierConfig::named("email")
        },
        IdentifierConfig::named("anonymous_id"),
    ]
}

/// One identifier type of `[[identity.identifiers]]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentifierConfig {
    /// The column name identity queries return for this type.
    pub name: String,
    /// How values are normalised before matching.
    #[serde(default)]
    pub normalize: Normalize,
    /// At most this many values of this type in one profile.
    #[serde(default)]
    pub limit: Option<u64>,
    /// Values that never link anything (compared after normalising, case-insensitively).
    #[serde(default)]
    pub blocklist: Vec<String>,
    /// A value linked to more distinct identifiers than this is shared junk and links nothing.
    #[serde(default)]
    pub max_links: Option<u64>,
}

impl IdentifierConfig {
    fn named(name: &str) -> Self {
        IdentifierConfig {
            name: name.to_string(),
            normalize: Normalize::Trim,
            limit: None,
            blocklist: Vec::new(),
            max_links: None,
        }
    }
}

/// How identifier values are normalised.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Normalize {
    /// Trim and lowercase.
    Email,
    /// E.164 digits, completed with the default country code.
    Phone,
    /// Trim surrounding white space.
    #[default]
    Trim,
    /// Use the value exactly as given.
    None,
}

/// `[profiles]`
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProfilesConfig {
    /// Traits from identify calls lifted into their own `profiles` columns.
    #[serde(default)]
    pub traits: Vec<String>,
}

/// `[export]`: how `tessera export … --hash-pii` treats personal data, column by column.
///
/// The defaults (in `crate::cli::export`) already cover identifier columns, names and JSON text
/// columns; these keys add columns or override a default.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// Column name → how it is written under `--hash-pii`.
    pub pii_columns: std::collections::BTreeMap<String, PiiHandling>,
    /// Top-level keys of JSON text columns (such as `traits`) kept under `--hash-pii`; without
    /// any, JSON text columns are left out of hashed exports.
    pub traits_allowlist: Vec<String>,
    /// How a phone number is written before hashing: `e164` (`+14155550123`, Google's
    /// customer-match rule) or `digits` (`14155550123`, Meta's rule).
    pub phone_format: PhoneFormat,
}

/// The text of a phone number that `--hash-pii` hashes.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PhoneFormat {
    /// E.164 with its `+`.
    #[default]
    E164,
    /// E.164 without the `+`: the country code and number only.
    Digits,
}

/// What `--hash-pii` does to one column.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PiiHandling {
    /// Normalised as an email (trim, lowercase), then SHA-256.
    Email,
    /// Normalised to E.164, then SHA-256.
    Phone,
    /// A person's name: trimmed and lowercased, then SHA-256.
    Name,
    /// Any other identifier: trimmed, then SHA-256.
    Hash,
    /// Left out of the file.
    Drop,
    /// Written as it is: the column holds no personal data.
    Keep,
}

impl ExportConfig {
    /// Keys that must never be kept from a JSON text column: identifiers, names and contact
    /// details (checked case-insensitively).
    pub const PII_TRAIT_KEYS: &'static [&'static str] = &[
        "email",
        "phone",
        "name",
        "first_name",
        "last_name",
        "firstname",
        "lastname",
        "full_name",
        "username",
        "address",
        "birthday",
        "user_id",
        "anonymous_id",
        "id",
    ];

    /// Checks of `[export]`; `identifiers` are the identity identifier type names.
    fn check(&self, identifiers: &[&str]) -> std::result::Result<(), (String, String)> {
        for column in self.pii_columns.keys() {
            if column.trim().is_empty() || column.trim() != column {
                return Err((
                    format!("export.pii_columns.\"{column}\""),
                    "a column name must not be empty or start or end with spaces".into(),
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, key) in self.traits_allowlist.iter().enumerate() {
            let at = format!("export.traits_allowlist[{i}]");
            if key.trim().is_empty() {
                return Err((at, "must not be empty".into()));
            }
            if !seen.insert(key.as_str()) {
                return Err((at, format!("\"{key}\" is listed twice")));
            }
            let lower = key.to_lowercase();
            let pii = Self::PII_TRAIT_KEYS.contains(&lower.as_str())
                || identifiers.iter().any(|id| *id == lower)
                || matches!(
                    self.pii_columns.get(key.as_str()),
                    Some(how) if *how != PiiHandling::Keep
                );
            if pii {
                return Err((
                    at,
                    format!(
                        "\"{key}\" is personal data and cannot be kept in clear in a hashed export; \
                         remove it (lift it into its own column with [profiles] traits and map that \
                         column in [export.pii_columns] to hash it)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// One SQL file of a project.
#[derive(Debug, Clone)]
pub struct QueryFile {
    /// The file relative to the project, as errors name it (e.g. `queries/traits/revenue.sql`).
    pub file: String,
    /// Its SQL.
    pub sql: String,
    /// Its full path.
    pub path: PathBuf,
}

/// A loaded project: its folder and its config.
#[derive(Debug, Clone)]
pub struct Project {
    /// The project folder; relative locations resolve against it.
    pub dir: PathBuf,
    /// The config file that was read (or would have been, when absent).
    pub config_file: PathBuf,
    /// The parsed config.
    pub config: Config,
}

impl Project {
    /// Loads `DIR/tessera.toml`.
    pub fn load(dir: &Path) -> Result<Project> {
        let dir = std::path::absolute(dir).map_err(|e| Error::io(dir, e))?;
        let dir = dir.as_path();
        let config_file = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_file).map_err(|e| Error::Config {
            file: config_file.clone(),
            key: None,
            message: if e.kind() == std::io::ErrorKind::NotFound {
                format!(
                    "no {CONFIG_FILE} here; pass --project DIR or create one with `tessera init DIR`"
                )
            } else {
                format!("cannot read: {e}")
            },
        })?;
        let config = Config::parse(&text, &config_file)?;
        Ok(Project {
            dir: dir.to_path_buf(),
            config_file,
            config,
        })
    }

    /// The folder holding SQL files of one kind (`identity`, `traits`, `segments`).
    pub fn queries_dir(&self, kind: &str) -> PathBuf {
        self.dir.join("queries").join(kind)
    }

    /// The `.sql` files of one kind, in file-name order, read.
    pub fn query_files(&self, kind: &str) -> Result<Vec<QueryFile>> {
        let mut files = self.sql_files(kind)?;
        files.extend(self.crm_queries(kind));
        Ok(files)
    }

    /// The queries `[sources.crm]` tables stand for: an identity query linking each contact's
    /// id, email and phone, and a trait query putting its fields onto its profile. Their
    /// `file` starts with `<` (no such file exists).
    pub fn crm_queries(&self, kind: &str) -> Vec<QueryFile> {
        let identifiers: Vec<&str> = self
            .config
            .identity
            .identifiers
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        let mut out = Vec::new();
        for source in &self.config.sources {
            let Some(crm) = &source.crm else { continue };
            let sql = match kind {
                "identity" => crm.identity_sql(&source.name, &identifiers),
                "traits" => crm.traits_sql(&source.name),
                _ => continue,
            };
            out.push(QueryFile {
                file: format!("<[sources.crm] of {}>", source.name),
                sql,
                path: self
                    .queries_dir(kind)
                    .join(format!("{}_crm.sql", source.name)),
            });
        }
        out
    }

    /// The `.sql` files of one kind in the project's folder, in file-name order, read.
    fn sql_files(&self, kind: &str) -> Result<Vec<QueryFile>> {
        let dir = self.queries_dir(kind);
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "sql"))
            .collect();
        paths.sort();
        paths
            .into_iter()
            .map(|path| {
                let sql = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
                let file = path
                    .strip_prefix(&self.dir)
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                Ok(QueryFile { file, sql, path })
            })
            .collect()
    }
}

impl Config {
    /// Parses and checks config text; `file` is only used in error messages.
    pub fn parse(text: &str, file: &Path) -> Result<Config> {
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|err| {
            let key = err.path().to_string();
            let inner = err.into_inner();
            // toml's own message carries the line and a caret under the offending text.
            let message = inner.message().to_string();
            let at = inner
                .span()
                .map(|span| format!(" (line {})", line_of(text, span.start)))
                .unwrap_or_default();
            let key = (key != ".").then_some(key);
            Error::Config {
                file: file.to_path_buf(),
                message: match &key {
                    Some(k) => format!("key `{k}`{at}: {message}"),
                    None => format!("{}{at}", message.trim_end()),
                },
                key,
            }
        })?;
        let mut config = config;
        if let Ok(toml::Value::Table(top)) = text.parse::<toml::Value>() {
            config.declared = top.keys().cloned().collect();
        }
        config.check(file)?;
        Ok(config)
    }

    /// `[[identity.probabilistic]]`: sources, identifier types, levels and probabilities.
    fn check_probabilistic(&self, fail: &dyn Fn(String, String) -> Error) -> Result<()> {
        let mut names = std::collections::HashSet::new();
        for (b, block) in self.identity.probabilistic.iter().enumerate() {
            let key = format!("identity.probabilistic[{b}]");
            if !is_sql_name(&block.name) || !names.insert(block.name.as_str()) {
                return Err(fail(
                    format!("{key}.name"),
                    format!(
                        "\"{}\" must be a unique name of lowercase letters, digits and _",
                        block.name
                    ),
                ));
            }
            match (&block.source, &block.query) {
                (Some(source), None) => {
                    if !self.sources.iter().any(|s| &s.name == source) {
                        return Err(fail(
                            format!("{key}.source"),
                            format!("no [[sources]] table is named \"{source}\": add one, or name an SQL file with `query`"),
                        ));
                    }
                }
                (None, Some(query)) => {
                    if !query.ends_with(".sql") || query.contains('/') || query.contains('\\') {
                        return Err(fail(
                            format!("{key}.query"),
                            format!("\"{query}\" must be the name of an .sql file in queries/identity/"),
                        ));
                    }
                }
                _ => {
                    return Err(fail(
                        format!("{key}.source"),
                        "set exactly one of `source` (a [[sources]] table) or `query` (an SQL file in queries/identity/)".into(),
                    ))
                }
            }
            if block.identifiers.is_empty() {
                return Err(fail(
                    format!("{key}.identifiers"),
                    "name at least one column that carries an identifier, e.g. identifiers = { customer_id = \"user_id\" }".into(),
                ));
            }
            for (column, kind) in &block.identifiers {
                if !self.identity.identifiers.iter().any(|t| &t.name == kind) {
                    return Err(fail(
                        format!("{key}.identifiers.{column}"),
                        format!("\"{kind}\" is not an identifier type in [[identity.identifiers]]"),
                    ));
                }
            }
            if block.blocking.is_empty() || block.blocking.iter().any(|r| r.trim().is_empty()) {
                return Err(fail(
                    format!("{key}.blocking"),
                    "give at least one join condition over l and r, e.g. \"l.postcode = r.postcode\"".into(),
                ));
            }
            if block.comparisons.is_empty() {
                return Err(fail(
                    format!("{key}.comparisons"),
                    "give at least one [[identity.probabilistic.comparisons]] with a column and its levels".into(),
                ));
            }
            for (c, comparison) in block.comparisons.iter().enumerate() {
                let ckey = format!("{key}.comparisons[{c}]");
                let levels = comparison
                    .parsed_levels()
                    .map_err(|(i, e)| fail(format!("{ckey}.levels[{i}]"), e))?;
                if levels.len() < 2 {
                    return Err(fail(
                        format!("{ckey}.levels"),
                        "give at least one level before else, e.g. [\"exact\"]".into(),
                    ));
                }
                for (which, fixed) in [("m", &comparison.m), ("u", &comparison.u)] {
                    let Some(values) = fixed else { continue };
                    if values.len() != levels.len()
                        || values.iter().any(|v| !(*v > 0.0 && *v <= 1.0))
                    {
                        return Err(fail(
                            format!("{ckey}.{which}"),
                            format!(
                                "give {} probabilities above 0 and at most 1, one per level with else last",
                                levels.len()
                            ),
                        ));
                    }
                }
            }
            for (field, value) in [
                ("threshold", block.threshold),
                ("report_floor", block.report_floor),
            ] {
                if !(value > 0.0 && value < 1.0) {
                    return Err(fail(
                        format!("{key}.{field}"),
                        format!("{value} is not a probability between 0 and 1 (exclusive)"),
                    ));
                }
            }
            if !(block.retrain_after_growth >= 0.0 && block.retrain_after_growth.is_finite()) {
                return Err(fail(
                    format!("{key}.retrain_after_growth"),
                    format!(
                        "{} is not a share of growth: give 0 (train every run) or more, e.g. 1.0 (train again when the records have doubled)",
                        block.retrain_after_growth
                    ),
                ));
            }
            if block.report_floor > block.threshold {
                return Err(fail(
                    format!("{key}.report_floor"),
                    format!(
                        "{} is above the threshold {}: every linked pair must be reported",
                        block.report_floor, block.threshold
                    ),
                ));
            }
            if block.prior.is_some_and(|p| !(p > 0.0 && p < 1.0)) {
                return Err(fail(
                    format!("{key}.prior"),
                    "must be a probability between 0 and 1 (exclusive)".into(),
                ));
            }
            for (field, value) in [
                ("u_pairs", block.u_pairs),
                ("max_iterations", u64::from(block.max_iterations)),
                ("max_pairs", block.max_pairs),
            ] {
                if value == 0 {
                    return Err(fail(format!("{key}.{field}"), "must be at least 1".into()));
                }
            }
            let mut columns = std::collections::HashSet::new();
            for (c, comparison) in block.comparisons.iter().enumerate() {
                if !columns.insert(comparison.column.as_str()) {
                    return Err(fail(
                        format!("{key}.comparisons[{c}].column"),
                        format!(
                            "\"{}\" is compared twice: give one comparison all its levels",
                            comparison.column
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks that go beyond types: names, duplicates, ranges.
    fn check(&self, file: &Path) -> Result<()> {
        let fail = |key: String, message: String| Error::Config {
            file: file.to_path_buf(),
            message: format!("key `{key}`: {message}"),
            key: Some(key),
        };
        if !(self.warnings.segment_change_percent > 0.0
            && self.warnings.segment_change_percent.is_finite())
        {
            return Err(fail(
                "warnings.segment_change_percent".into(),
                "must be a percentage above 0, e.g. 50".into(),
            ));
        }
        if self.report.runs == 0 {
            return Err(fail(
                "report.runs".into(),
                "must be at least 1 (how many runs the report's charts show)".into(),
            ));
        }
        if self.identity.identifiers.is_empty() {
            return Err(fail(
                "identity.identifiers".into(),
                "needs at least one identifier type (or remove [identity] to use the defaults)"
                    .into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, id) in self.identity.identifiers.iter().enumerate() {
            let key = format!("identity.identifiers[{i}]");
            if !is_sql_name(&id.name) {
                return Err(fail(
                    format!("{key}.name"),
                    format!(
                        "\"{}\" is not a usable column name: use lowercase letters, digits and _, starting with a letter",
                        id.name
                    ),
                ));
            }
            if !seen.insert(id.name.as_str()) {
                return Err(fail(
                    format!("{key}.name"),
                    format!("identifier type \"{}\" is listed twice", id.name),
                ));
            }
            if id.limit == Some(0) {
                return Err(fail(
                    format!("{key}.limit"),
                    "must be at least 1 (leave it out for no limit)".into(),
                ));
            }
            if id.max_links == Some(0) {
                return Err(fail(
                    format!("{key}.max_links"),
                    "must be at least 1 (leave it out for no cap)".into(),
                ));
            }
        }
        let cc = &self.identity.default_country_code;
        if cc.is_empty() || cc.len() > 3 || !cc.bytes().all(|b| b.is_ascii_digit()) {
            return Err(fail(
                "identity.default_country_code".into(),
                format!("\"{cc}\" is not a country calling code: use 1 to 3 digits, e.g. \"1\" or \"44\""),
            ));
        }
        self.check_probabilistic(&fail)?;
        for (key, value) in [
            ("run.memory_limit", &self.run.memory_limit),
            ("run.max_spill", &self.run.max_spill),
        ] {
            if parse_size(value, 1 << 30).is_none() {
                return Err(fail(
                    key.into(),
                    format!(
                        "\"{value}\" is not a size: write e.g. \"4GiB\", \"512MiB\" or \"60%\""
                    ),
                ));
            }
        }
        if parse_duration(&self.run.query_timeout).is_none() {
            return Err(fail(
                "run.query_timeout".into(),
                format!(
                    "\"{}\" is not a time limit: write e.g. \"30m\", \"90s\" or \"2h\" (at least 1 second, at most 7 days)",
                    self.run.query_timeout
                ),
            ));
        }
        for bound in self.bounds() {
            if !bound.range.contains(&bound.value) {
                return Err(fail(
                    bound.key.into(),
                    format!(
                        "{} is out of range: use {} to {} {} ({})",
                        bound.value,
                        bound.range.start(),
                        bound.range.end(),
                        bound.unit,
                        bound.why
                    ),
                ));
            }
        }
        if self.storage.retry.max_backoff_ms < self.storage.retry.initial_backoff_ms {
            return Err(fail(
                "storage.retry.max_backoff_ms".into(),
                format!(
                    "{} is below initial_backoff_ms ({}): the longest wait must not be shorter than the first",
                    self.storage.retry.max_backoff_ms, self.storage.retry.initial_backoff_ms
                ),
            ));
        }
        let p = &self.predictions;
        if p.purchase_event.trim().is_empty() {
            return Err(fail(
                "predictions.purchase_event".into(),
                "must name the track event of a purchase, e.g. \"Order Completed\"".into(),
            ));
        }
        if p.revenue.trim().is_empty() {
            return Err(fail(
                "predictions.revenue".into(),
                "must name the purchase property holding its value, e.g. \"revenue\"".into(),
            ));
        }
        if p.clv_months == 0 || p.clv_months > 1200 {
            return Err(fail(
                "predictions.clv_months".into(),
                format!("{} is out of range: use 1 to 1200 months", p.clv_months),
            ));
        }
        if !(p.discount_rate.is_finite() && (0.0..1.0).contains(&p.discount_rate)) {
            return Err(fail(
                "predictions.discount_rate".into(),
                format!(
                    "{} is not a monthly rate: use a number from 0 up to (not including) 1, e.g. 0.01",
                    p.discount_rate
                ),
            ));
        }
        for (i, test) in self.tests.iter().enumerate() {
            if !(test.unique
                || test.not_null
                || test.accepted_values.is_some()
                || test.relationships.is_some())
            {
                return Err(fail(
                    format!("tests[{i}]"),
                    "checks nothing: add unique = true, not_null = true, accepted_values = [...] or relationships = { to = \"TABLE\", field = \"COLUMN\" }".into(),
                ));
            }
            let names = [("table", &test.table), ("column", &test.column)]
                .into_iter()
                .chain(test.relationships.iter().flat_map(|r| {
                    [
                        ("relationships.to", &r.to),
                        ("relationships.field", &r.field),
                    ]
                }));
            for (key, name) in names {
                let plain = name.split('.').all(|part| {
                    !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                });
                if !plain {
                    return Err(fail(
                        format!("tests[{i}].{key}"),
                        format!("\"{name}\" is not a table or column name: letters, digits and _ (a table may be SEGMENTS_OR_REPORTS.NAME)"),
                    ));
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, source) in self.sources.iter().enumerate() {
            if !is_sql_name(&source.name) {
                return Err(fail(
                    format!("sources[{i}].name"),
                    format!(
                        "\"{}\" is not a usable table name: use lowercase letters, digits and _, starting with a letter",
                        source.name
                    ),
                ));
            }
            if crate::tables::RESERVED.contains(&source.name.as_str()) {
                return Err(fail(
                    format!("sources[{i}].name"),
                    format!(
                        "\"{}\" is the name of a Tessera table; pick another",
                        source.name
                    ),
                ));
            }
            if !names.insert(source.name.as_str()) {
                return Err(fail(
                    format!("sources[{i}].name"),
                    format!("source \"{}\" is listed twice", source.name),
                ));
            }
            for (key, value) in [
                ("delimiter", &source.csv.delimiter),
                ("quote", &source.csv.quote),
            ] {
                if csv_char(value).is_none() {
                    return Err(fail(
                        format!("sources[{i}].csv.{key}"),
                        format!("{value:?} is not one ASCII character: write e.g. \",\", \";\" or \"\\t\""),
                    ));
                }
            }
            if let Some(crm) = &source.crm {
                let identifier = crm.identifier();
                if !self
                    .identity
                    .identifiers
                    .iter()
                    .any(|t| t.name == identifier)
                {
                    return Err(fail(
                        format!("sources[{i}].crm.identifier"),
                        format!(
                            "\"{identifier}\" is not an identifier type of [identity]: add [[identity.identifiers]] name = \"{identifier}\" (with limit = 1 if one contact is one person)"
                        ),
                    ));
                }
                for trait_name in crm.traits().keys() {
                    if !is_sql_name(trait_name) {
                        return Err(fail(
                            format!("sources[{i}].crm.traits"),
                            format!("\"{trait_name}\" is not a usable column name: use lowercase letters, digits and _, starting with a letter"),
                        ));
                    }
                }
            }
        }
        let mut export_names = std::collections::HashSet::new();
        for (i, export) in self.exports.iter().enumerate() {
            if !is_sql_name(&export.name) || !export_names.insert(export.name.as_str()) {
                return Err(fail(
                    format!("exports[{i}].name"),
                    format!("\"{}\" must be unique and use lowercase letters, digits and _, starting with a letter", export.name),
                ));
            }
            if let Some(d) = &export.delimiter {
                if !matches!(csv_char(d), Some(b',' | b';' | b'|' | b'\t' | b'^' | b'`')) {
                    return Err(fail(
                        format!("exports[{i}].delimiter"),
                        format!("{d:?} is not a delimiter Salesforce Bulk API 2.0 takes: use \",\", \";\", \"|\", \"\\t\", \"^\" or \"`\""),
                    ));
                }
            }
            if export.max_file_bytes == Some(0) {
                return Err(fail(
                    format!("exports[{i}].max_file_bytes"),
                    "must be at least 1".into(),
                ));
            }
        }
        for (key, value) in [
            ("storage.events", &self.storage.events),
            ("storage.output", &self.storage.output),
        ] {
            if value.trim().is_empty() {
                return Err(fail(key.into(), "must not be empty".into()));
            }
        }
        let identifiers: Vec<&str> = self
            .identity
            .identifiers
            .iter()
            .map(|i| i.name.as_str())
            .collect();
        if let Err((key, message)) = self.export.check(&identifiers) {
            return Err(fail(key, message));
        }
        Ok(())
    }
}

/// One numeric config value and the range it must lie in.
///
/// Every duration and count is bounded so that no value reaches the code that turns it into a
/// `Duration` (or a chrono one, whose range is smaller) out of range: such a value was once
/// read as 0, which made "keep forever" delete every old file.
pub struct Bound {
    /// The dotted key.
    pub key: &'static str,
    /// The value as configured.
    pub value: u64,
    /// The values accepted, inclusive.
    pub range: std::ops::RangeInclusive<u64>,
    /// The unit, for the message.
    pub unit: &'static str,
    /// What the bounds are for, for the message.
    pub why: &'static str,
}

impl Config {
    /// The bounded numeric keys with their values.
    pub fn bounds(&self) -> Vec<Bound> {
        let r = &self.storage.retry;
        let b = |key, value: u64, range, unit, why| Bound {
            key,
            value,
            range,
            unit,
            why,
        };
        let mut bounds = vec![
            b("run.lease_seconds", self.run.lease_seconds, 2..=7 * 24 * 3600, "seconds",
              "a run renews its lease every third of it; a week at most, so a dead run's lease ends"),
            b("run.retention_hours", self.run.retention_hours, 0..=100 * 365 * 24, "hours",
              "old versions' files are deleted once older than this; 876000 hours (100 years) keeps them for good"),
            b("storage.retry.max_retries", r.max_retries as u64, 0..=100, "retries", "per request"),
            b("storage.retry.retry_timeout_secs", r.retry_timeout_secs, 1..=3600, "seconds",
              "keep it under 300: retries reuse the request's signature"),
            b("storage.retry.initial_backoff_ms", r.initial_backoff_ms, 1..=60_000, "milliseconds",
              "the first wait before a retry"),
            b("storage.retry.max_backoff_ms", r.max_backoff_ms, 1..=600_000, "milliseconds",
              "the longest wait between two attempts"),
            b("storage.retry.request_timeout_secs", r.request_timeout_secs, 1..=3600, "seconds",
              "a request that takes longer fails"),
            b("storage.retry.connect_timeout_secs", r.connect_timeout_secs, 1..=600, "seconds",
              "connecting takes at most this"),
            b("sessions.gap_minutes", self.sessions.gap_minutes as u64, 1..=7 * 24 * 60, "minutes",
              "minutes of inactivity that end a session; a week at most"),
        ];
        if let Some(n) = self.run.cluster_partitions {
            bounds.push(b("run.cluster_partitions", n as u64, 1..=100_000, "partitions",
              "the tasks of each stage of a job sent to a cluster: the executors' task slots together, or remove it"));
        }
        bounds
    }
}

/// A name SQL can use unquoted: `^[a-z][a-z0-9_]{0,62}$`.
pub fn is_sql_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z'))
        && name.len() <= 63
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_parse_in_every_unit_and_share() {
        assert_eq!(parse_size("4GiB", 0), Some(4 << 30));
        assert_eq!(parse_size("512 MiB", 0), Some(512 << 20));
        assert_eq!(parse_size("2GB", 0), Some(2_000_000_000));
        assert_eq!(parse_size("1048576", 0), Some(1 << 20));
        assert_eq!(parse_size("60%", 1000), Some(600));
        assert_eq!(parse_size("1.5gib", 0), Some(3 << 29));
        for bad in ["lots", "0", "-1GiB", "150%", "0%", "4 GiBs", ""] {
            assert_eq!(parse_size(bad, 1000), None, "{bad}");
        }
    }

    #[test]
    fn time_limits_parse_in_seconds_minutes_and_hours_up_to_a_week() {
        use std::time::Duration;
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_duration(" 2 h "), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("600"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("168h"), Some(MAX_QUERY_TIMEOUT));
        for bad in [
            "0",
            "0m",
            "-1s",
            "1.5h",
            "soon",
            "",
            "169h",
            "8d",
            "18446744073709551615h",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        let (key, message) = err("[run]\nquery_timeout = \"0s\"\n");
        assert_eq!(key.as_deref(), Some("run.query_timeout"), "{message}");
        assert_eq!(parse("").unwrap().run.query_timeout, "30m");
    }

    #[test]
    fn run_settings_are_checked_and_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            "[run]\nmemory_limit = \"plenty\"\n",
        )
        .unwrap();
        let err = Project::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("run.memory_limit") && err.contains("plenty"),
            "{err}"
        );
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            "[storage.retry]\nmax_retrys = 3\n",
        )
        .unwrap();
        let err = Project::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("max_retrys"), "{err}");
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            "[storage.retry]\nmax_retries = 3\n[run]\nlease_seconds = 60\nmemory_limit = \"2GiB\"\n",
        )
        .unwrap();
        let project = Project::load(dir.path()).unwrap();
        assert_eq!(project.config.storage.retry.max_retries, 3);
        assert_eq!(project.config.storage.retry.request_timeout_secs, 30);
        assert_eq!(project.config.run.lease_seconds, 60);
    }

    proptest::proptest! {
        #[test]
        fn every_bounded_key_takes_its_range_and_names_itself_outside_it(
            which in 0usize..10,
            value in proptest::prop_oneof![
                0u64..2_000_000,
                0u64..=i64::MAX as u64,
                proptest::sample::select(vec![0, 1, 2, 3600, 876_000, 876_001, 604_800, 604_801, i64::MAX as u64]),
            ],
        ) {
            // An optional key is bounded when set.
            let mut config = Config::default();
            config.run.cluster_partitions = Some(1);
            let bounds = config.bounds();
            let bound = &bounds[which % bounds.len()];
            let (section, key) = bound.key.rsplit_once('.').unwrap();
            // Keep the other backoff out of the way: the two are also checked against each other.
            let other = match key {
                "initial_backoff_ms" => "max_backoff_ms = 600000\n",
                "max_backoff_ms" => "initial_backoff_ms = 1\n",
                _ => "",
            };
            let text = format!("[{section}]\n{key} = {value}\n{other}");
            match parse(&text) {
                Ok(config) => {
                    proptest::prop_assert!(bound.range.contains(&value), "{} = {value} accepted", bound.key);
                    // What the run makes of accepted values never overflows.
                    let lease = std::time::Duration::from_secs(config.run.lease_seconds);
                    let kept = std::time::Duration::from_secs(config.run.retention_hours * 3600);
                    for d in [lease, kept] {
                        let d = chrono::Duration::from_std(d).unwrap();
                        proptest::prop_assert!(chrono::Utc::now().checked_add_signed(d).is_some());
                        proptest::prop_assert!(chrono::Utc::now().checked_sub_signed(d).is_some());
                    }
                }
                Err(Error::Config { key: Some(named), message, .. }) => {
                    proptest::prop_assert!(!bound.range.contains(&value), "{} = {value} refused: {message}", bound.key);
                    proptest::prop_assert_eq!(named, bound.key.to_string());
                }
                Err(other) => proptest::prop_assert!(false, "{other}"),
            }
        }
    }

    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, Path::new("/p/tessera.toml"))
    }

    fn err(text: &str) -> (Option<String>, String) {
        match parse(text).unwrap_err() {
            Error::Config { key, message, file } => {
                assert_eq!(file, Path::new("/p/tessera.toml"));
                (key, message)
            }
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn formats_parse_and_unknown_ones_name_their_key() {
        let c = parse(
            "[storage]\nevents_format = \"snowplow\"\n[[sources]]\nname = \"rs\"\nlocation = \"l\"\nformat = \"rudderstack\"\n[[sources]]\nname = \"t\"\nlocation = \"m\"\n",
        )
        .unwrap();
        assert_eq!(c.storage.events_format, EventFormat::Snowplow);
        assert_eq!(c.sources[0].format.events(), Some(EventFormat::Rudderstack));
        assert_eq!(c.sources[1].format, SourceFormat::Parquet);
        assert_eq!(
            parse("").unwrap().storage.events_format,
            EventFormat::Segment
        );
        let (key, msg) = err("[storage]\nevents_format = \"mixpanel\"\n");
        assert_eq!(key.as_deref(), Some("storage.events_format"), "{msg}");
        assert!(msg.contains("segment_datalake"), "{msg}");
    }

    #[test]
    fn storage_only_gets_segment_defaults() {
        let c = parse("[storage]\nevents = \"e\"\noutput = \"o\"\n").unwrap();
        assert_eq!(c.storage.events, "e");
        let names: Vec<_> = c
            .identity
            .identifiers
            .iter()
            .map(|i| i.name.as_str())
            .collect();
        assert_eq!(names, ["user_id", "email", "anonymous_id"]);
        assert_eq!(c.identity.identifiers[0].limit, Some(1));
        assert_eq!(c.identity.identifiers[1].normalize, Normalize::Email);
    }

    #[test]
    fn empty_file_is_a_project_with_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.storage.output, "out");
    }

    #[test]
    fn unknown_top_level_key_is_named() {
        let (key, msg) = err("[storag]\nevents = \"x\"\n");
        assert_eq!(key.as_deref(), Some("storag"));
        assert!(msg.contains("storag"), "{msg}");
        assert!(msg.contains("line 1"), "{msg}");
    }

    #[test]
    fn unknown_nested_key_is_named_with_its_path() {
        let (key, msg) = err("[[identity.identifiers]]\nname = \"email\"\nlimt = 2\n");
        assert_eq!(
            key.as_deref(),
            Some("identity.identifiers[0].limt"),
            "{msg}"
        );
        assert!(msg.contains("unknown field `limt`"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn wrong_type_is_named() {
        let (key, msg) = err("[[identity.identifiers]]\nname = \"email\"\nlimit = \"three\"\n");
        assert_eq!(
            key.as_deref(),
            Some("identity.identifiers[0].limit"),
            "{msg}"
        );
        assert!(msg.contains("invalid type"), "{msg}");
    }

    #[test]
    fn unknown_normaliser_is_named() {
        let (key, msg) = err("[[identity.identifiers]]\nname = \"email\"\nnormalize = \"upper\"\n");
        assert_eq!(
            key.as_deref(),
            Some("identity.identifiers[0].normalize"),
            "{msg}"
        );
        assert!(msg.contains("email") && msg.contains("phone"), "{msg}");
    }

    #[test]
    fn missing_required_key_is_named() {
        let (key, msg) = err("[[sources]]\nname = \"crm\"\n");
        assert_eq!(key.as_deref(), Some("sources[0]"), "{msg}");
        assert!(msg.contains("location"), "{msg}");
    }

    #[test]
    fn zero_limit_is_refused() {
        let (key, _) = err("[[identity.identifiers]]\nname = \"email\"\nlimit = 0\n");
        assert_eq!(key.as_deref(), Some("identity.identifiers[0].limit"));
    }

    #[test]
    fn duplicate_identifier_is_refused() {
        let (key, msg) = err("[[identity.identifiers]]\nname = \"email\"\n[[identity.identifiers]]\nname = \"email\"\n");
        assert_eq!(key.as_deref(), Some("identity.identifiers[1].name"));
        assert!(msg.contains("twice"), "{msg}");
    }

    #[test]
    fn bad_names_are_refused() {
        let (key, _) = err("[[identity.identifiers]]\nname = \"E-mail\"\n");
        assert_eq!(key.as_deref(), Some("identity.identifiers[0].name"));
        let (key, _) = err("[[sources]]\nname = \"events\"\nlocation = \"x\"\n");
        assert_eq!(key.as_deref(), Some("sources[0].name"));
    }

    #[test]
    fn bad_country_code_is_refused() {
        let (key, _) = err("[identity]\ndefault_country_code = \"+44\"\n");
        assert_eq!(key.as_deref(), Some("identity.default_country_code"));
    }

    #[test]
    fn syntax_error_gives_the_line() {
        let (key, msg) = err("[storage]\nevents = \n");
        assert_eq!(key, None);
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn missing_file_says_how_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let e = Project::load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("tessera.toml") && e.contains("tessera init"),
            "{e}"
        );
    }

    #[test]
    fn export_section_is_checked_and_named() {
        let c = parse("[export]\ntraits_allowlist = [\"plan\"]\n[export.pii_columns]\nnickname = \"name\"\nplan = \"keep\"\n").unwrap();
        assert_eq!(c.export.pii_columns["nickname"], PiiHandling::Name);
        assert_eq!(c.export.traits_allowlist, ["plan"]);
        let (key, msg) = err("[export]\ntraits_allowlist = [\"plan\", \"Email\"]\n");
        assert_eq!(key.as_deref(), Some("export.traits_allowlist[1]"), "{msg}");
        assert!(msg.contains("personal data"), "{msg}");
        // An identifier type's name is personal data too.
        let (key, _) = err("[[identity.identifiers]]\nname = \"crm_id\"\n[export]\ntraits_allowlist = [\"crm_id\"]\n");
        assert_eq!(key.as_deref(), Some("export.traits_allowlist[0]"));
        let (key, msg) = err("[export.pii_columns]\nnickname = \"scramble\"\n");
        assert_eq!(key.as_deref(), Some("export.pii_columns.nickname"), "{msg}");
        assert!(msg.contains("drop") && msg.contains("keep"), "{msg}");
        let (key, _) = err("[export]\nallowlist = []\n");
        assert_eq!(key.as_deref(), Some("export.allowlist"));
    }

    #[test]
    fn sql_names() {
        assert!(is_sql_name("crm_contacts"));
        assert!(!is_sql_name("Crm"));
        assert!(!is_sql_name("1x"));
        assert!(!is_sql_name(""));
    }

    #[test]
    fn crm_sources_and_exports_are_checked_by_key() {
        let source = "[[sources]]\nname = \"crm\"\nlocation = \"x.csv\"\nformat = \"csv\"\n";
        let (key, msg) = err(&format!("{source}[sources.crm]\nsystem = \"salesforce\"\n"));
        assert_eq!(key.as_deref(), Some("sources[0].crm.identifier"), "{msg}");
        assert!(msg.contains("salesforce_id"), "{msg}");
        let ids = "[[identity.identifiers]]\nname = \"hubspot_id\"\n";
        let c = parse(&format!(
            "{source}[sources.crm]\nsystem = \"hubspot\"\n{ids}"
        ))
        .unwrap();
        let crm = c.sources[0].crm.as_ref().unwrap();
        assert_eq!(
            (crm.id_column(), crm.modified_column()),
            ("hs_object_id".into(), "lastmodifieddate".into())
        );
        let (key, _) = err(&format!("{source}[sources.csv]\ndelimiter = \";;\"\n"));
        assert_eq!(key.as_deref(), Some("sources[0].csv.delimiter"));
        assert_eq!(
            parse(&format!("{source}[sources.csv]\ndelimiter = \"\\\\t\"\n"))
                .unwrap()
                .sources[0]
                .csv
                .delimiter,
            "\\t"
        );
        let export = "[[exports]]\nname = \"sf\"\nsegment = \"s\"\ntarget = \"salesforce\"\n";
        let (key, _) = err(&format!("{export}delimiter = \"#\"\n"));
        assert_eq!(key.as_deref(), Some("exports[0].delimiter"));
        let (key, _) = err(&format!("{export}{export}"));
        assert_eq!(key.as_deref(), Some("exports[1].name"));
        let (key, _) = err("[[exports]]\nname = \"x\"\nsegment = \"s\"\ntarget = \"marketo\"\n");
        assert_eq!(key.as_deref(), Some("exports[0].target"));
    }
}
