//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema};
use tempfile::TempDir;

/// The repository root (the bundled project).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `tessera` binary built for these tests, with a clean logging environment.
pub fn tessera() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera"));
    cmd.env_remove("RUST_LOG");
    cmd
}

/// Runs the binary and returns its output; panics with stderr when `expect_ok` and it failed.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("the tessera binary runs")
}

/// stdout as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts success and returns stdout.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "tessera failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// A project in a temporary folder.
pub struct TempProject {
    /// Keeps the folder alive.
    pub dir: TempDir,
}

impl TempProject {
    /// A project with `config` as its tessera.toml.
    pub fn new(config: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("tessera.toml"), config).expect("write config");
        TempProject { dir }
    }

    /// A project with default storage (events in data/events, output in out).
    pub fn local() -> Self {
        Self::new("[storage]\nevents = \"data/events\"\noutput = \"out\"\n")
    }

    /// Its folder.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The events folder.
    pub fn events(&self) -> PathBuf {
        self.path().join("data/events")
    }

    /// `tessera --project DIR ARGS…`
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = tessera();
        cmd.arg("--project").arg(self.path()).args(args);
        cmd
    }

    /// Runs `tessera run --json` and returns the report.
    pub fn run_json(&self) -> serde_json::Value {
        let text = ok(run(&mut self.cmd(&["run", "--json", "--quiet"])));
        serde_json::from_str(text.trim()).expect("run --json prints one JSON object")
    }

    /// Runs a query and returns its rows as JSON objects.
    pub fn query(&self, sql: &str) -> Vec<serde_json::Value> {
        let text = ok(run(
            &mut self.cmd(&["query", sql, "--format", "json", "--quiet"])
        ));
        serde_json::from_str::<Vec<serde_json::Value>>(text.trim())
            .unwrap_or_else(|e| panic!("query output is a JSON array ({e}): {text}"))
    }
}

/// One event row for hand-made fixtures.
#[derive(Clone, Default)]
pub struct Ev {
    pub message_id: Option<&'static str>,
    pub kind: Option<&'static str>,
    pub event: Option<&'static str>,
    pub anonymous_id: Option<&'static str>,
    pub user_id: Option<&'static str>,
    pub timestamp: Option<i64>,
    pub received_at: Option<i64>,
    pub traits: Option<&'static str>,
    pub properties: Option<&'static str>,
    pub context: Option<&'static str>,
}

impl Ev {
    /// The same event with a user_id.
    pub fn with_user(self, user: &'static str) -> Ev {
        Ev {
            user_id: Some(user),
            ..self
        }
    }

    /// A valid track event.
    pub fn track(id: &'static str, ts: i64) -> Ev {
        Ev {
            message_id: Some(id),
            kind: Some("track"),
            event: Some("Product Viewed"),
            anonymous_id: Some("anon-1"),
            timestamp: Some(ts),
            received_at: Some(ts + 1_000_000),
            properties: Some(r#"{"price": 10}"#),
            ..Ev::default()
        }
    }
}

/// A batch of events with the Segment-spec columns.
pub fn events_batch(rows: &[Ev]) -> RecordBatch {
    let s = |f: fn(&Ev) -> Option<&'static str>| {
        Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>())) as ArrayRef
    };
    let t = |f: fn(&Ev) -> Option<i64>| {
        Arc::new(
            TimestampMicrosecondArray::from(rows.iter().map(f).collect::<Vec<_>>())
                .with_timezone("UTC"),
        ) as ArrayRef
    };
    let ts = DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, Some("UTC".into()));
    let schema = Arc::new(Schema::new(vec![
        Field::new("message_id", DataType::Utf8, true),
        Field::new("type", DataType::Utf8, true),
        Field::new("event", DataType::Utf8, true),
        Field::new("anonymous_id", DataType::Utf8, true),
        Field::new("user_id", DataType::Utf8, true),
        Field::new("timestamp", ts.clone(), true),
        Field::new("received_at", ts, true),
        Field::new("traits", DataType::Utf8, true),
        Field::new("properties", DataType::Utf8, true),
        Field::new("context", DataType::Utf8, true),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            s(|e| e.message_id),
            s(|e| e.kind),
            s(|e| e.event),
            s(|e| e.anonymous_id),
            s(|e| e.user_id),
            t(|e| e.timestamp),
            t(|e| e.received_at),
            s(|e| e.traits),
            s(|e| e.properties),
            s(|e| e.context),
        ],
    )
    .expect("valid batch")
}

/// Writes batches as a Parquet file at `path` (folders created).
pub fn write_parquet(path: &Path, batches: &[RecordBatch]) {
    std::fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
    let bytes =
        tessera::cli::generate::parquet_bytes(batches[0].schema(), batches).expect("encode");
    std::fs::write(path, bytes).expect("write parquet");
}

/// Runs `tessera generate` into `out`.
pub fn generate(out: &Path, people: u64, days: u32, seed: u64) -> serde_json::Value {
    let text = ok(run(tessera().args([
        "generate",
        "--out",
        out.to_str().expect("utf-8 path"),
        "--people",
        &people.to_string(),
        "--days",
        &days.to_string(),
        "--seed",
        &seed.to_string(),
        "--json",
    ])));
    serde_json::from_str(text.trim()).expect("generate --json prints JSON")
}

/// Whether tests that need `what` must run (set by scripts/test.sh) rather than skip.
fn required() -> bool {
    std::env::var_os("TESSERA_TEST_REQUIRE_ALL").is_some()
}

/// True when the S3 test server is configured; otherwise skips (or fails under scripts/test.sh).
pub fn s3_available(test: &str) -> bool {
    if std::env::var_os("TESSERA_TEST_S3").is_some() {
        return true;
    }
    assert!(
        !required(),
        "{test} needs the S3 server that scripts/test.sh starts"
    );
    eprintln!("SKIPPED {test}: no S3 server (run scripts/test.sh)");
    false
}

/// The Python with the readers installed; `None` skips (or fails under scripts/test.sh).
pub fn python(test: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TESSERA_TEST_PYTHON") {
        return Some(PathBuf::from(p));
    }
    assert!(
        !required(),
        "{test} needs the Python readers that scripts/test.sh installs"
    );
    eprintln!("SKIPPED {test}: no Python readers (run scripts/test.sh)");
    None
}

/// Debian's headless Chromium; `None` skips (or fails under scripts/test.sh, which installs it).
pub fn chromium(test: &str) -> Option<PathBuf> {
    for name in ["chromium", "chromium-browser"] {
        let found = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        });
        if found.is_some() {
            return found;
        }
    }
    assert!(
        !required(),
        "{test} needs Chromium (`apt-get install chromium`; scripts/test.sh installs it)"
    );
    eprintln!("SKIPPED {test}: no chromium on PATH");
    None
}

/// A fresh key prefix in the S3 test bucket.
pub fn s3_prefix() -> String {
    format!("s3://tessera-test/{}", uuid::Uuid::new_v4().simple())
}

/// Copies a folder tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}
