//! Landing formats: RudderStack's data lake, Segment Data Lakes and the Snowplow lake loader's
//! Delta table read into the same events, identities and profiles as the equivalent
//! Segment-spec events, and each format's broken inputs skipped or quarantined with reasons.
//!
//! The fixtures are written here, in Rust, from the producers' documented names, types and
//! folder layouts (the Snowplow table through deltalake, so its log is a real one), so the
//! suite needs no Python. The Segment-spec equivalents are written by hand from the same
//! logical events, following the mapping `docs/formats.md` documents.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Date32Array, Float64Array, Int64Array, ListArray, RecordBatch, StringArray,
    StructArray, TimestampMicrosecondArray,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Fields, Schema};
use serde_json::{json, Value};

use crate::common::{events_batch, ok, run, write_parquet, Ev, TempProject};

/// 2026-12-01T10:00:00Z in microseconds.
const T0: i64 = 1_796_119_200_000_000;
const SECOND: i64 = 1_000_000;

fn strs(values: &[Option<&str>]) -> ArrayRef {
    Arc::new(StringArray::from(values.to_vec()))
}

fn ints(values: &[Option<i64>]) -> ArrayRef {
    Arc::new(Int64Array::from(values.to_vec()))
}

fn floats(values: &[Option<f64>]) -> ArrayRef {
    Arc::new(Float64Array::from(values.to_vec()))
}

fn times(values: &[Option<i64>]) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from(values.to_vec()).with_timezone("UTC"))
}

fn batch(columns: Vec<(&str, ArrayRef)>) -> RecordBatch {
    let fields: Vec<Field> = columns
        .iter()
        .map(|(name, a)| Field::new(*name, a.data_type().clone(), true))
        .collect();
    RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .expect("valid batch")
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// A RudderStack lake under `root`: `identifies` and `pages` in the default hourly layout with
/// annotated timestamps, the `product_viewed` event table in a `dt=` layout whose files carry
/// neither `timestamp` nor `anonymous_id` and hold INT64 microseconds, and the `tracks` and
/// `users` tables (which repeat those calls and users and must not add events).
fn rudderstack_lake(root: &Path) {
    let lake = root.join("rudder-datalake/web");
    write_parquet(
        &lake.join("identifies/2026/12/01/10/identifies.1.parquet"),
        &[batch(vec![
            ("id", strs(&[Some("m-r1")])),
            ("anonymous_id", strs(&[Some("rs-anon-1")])),
            ("user_id", strs(&[Some("u-ann")])),
            ("received_at", times(&[Some(T0 + SECOND)])),
            ("sent_at", times(&[Some(T0)])),
            ("timestamp", times(&[Some(T0)])),
            ("original_timestamp", times(&[Some(T0)])),
            ("email", strs(&[Some("ann@example.com")])),
            ("plan", strs(&[Some("pro")])),
            ("context_ip", strs(&[Some("10.0.0.1")])),
            ("context_traits_email", strs(&[Some("ann@example.com")])),
            ("uuid_ts", times(&[Some(T0 + 60 * SECOND)])),
            ("channel", strs(&[Some("web")])),
        ])],
    );
    write_parquet(
        &lake.join("product_viewed/dt=2026-12-01/product_viewed.1.parquet"),
        &[batch(vec![
            ("id", strs(&[Some("m-r2"), Some("m-r3")])),
            ("user_id", strs(&[None, None])),
            (
                "event",
                strs(&[Some("Product Viewed"), Some("Product Viewed")]),
            ),
            (
                "event_text",
                strs(&[Some("Product Viewed"), Some("Product Viewed")]),
            ),
            ("_timestamp", ints(&[Some(T0 + 60 * SECOND), None])),
            (
                "original_timestamp",
                ints(&[Some(T0 + 59 * SECOND), Some(T0 + 120 * SECOND)]),
            ),
            (
                "sent_at",
                ints(&[Some(T0 + 61 * SECOND), Some(T0 + 121 * SECOND)]),
            ),
            (
                "received_at",
                ints(&[Some(T0 + 62 * SECOND), Some(T0 + 122 * SECOND)]),
            ),
            (
                "context_traits_anonymous_id",
                strs(&[Some("rs-anon-1"), Some("rs-anon-1")]),
            ),
            ("context_page_path", strs(&[Some("/p/1"), Some("/p/2")])),
            ("sku", strs(&[Some("sku-1"), Some("sku-2")])),
            ("price", ints(&[Some(10), Some(20)])),
        ])],
    );
    write_parquet(
        &lake.join("tracks/dt=2026-12-01/tracks.1.parquet"),
        &[batch(vec![
            ("id", strs(&[Some("m-r2"), Some("m-r3")])),
            (
                "event",
                strs(&[Some("Product Viewed"), Some("Product Viewed")]),
            ),
            (
                "original_timestamp",
                ints(&[Some(T0 + 59 * SECOND), Some(T0 + 120 * SECOND)]),
            ),
        ])],
    );
    write_parquet(
        &lake.join("users/2026/12/01/10/users.1.parquet"),
        &[batch(vec![
            ("id", strs(&[Some("u-ann")])),
            ("email", strs(&[Some("ann@example.com")])),
            ("received_at", times(&[Some(T0 + SECOND)])),
        ])],
    );
    write_parquet(
        &lake.join("pages/2026/12/01/11/pages.1.parquet"),
        &[batch(vec![
            ("id", strs(&[Some("m-r4")])),
            ("anonymous_id", strs(&[Some("rs-anon-2")])),
            ("received_at", times(&[Some(T0 + 3601 * SECOND)])),
            ("timestamp", times(&[Some(T0 + 3600 * SECOND)])),
            ("name", strs(&[Some("Home")])),
            ("url", strs(&[Some("https://shop.example/")])),
            ("context_library_name", strs(&[Some("rudder-analytics.js")])),
        ])],
    );
}

/// The RudderStack lake's events as Segment-spec rows.
fn rudderstack_as_segment() -> Vec<Ev> {
    vec![
        Ev {
            message_id: Some("m-r1"),
            kind: Some("identify"),
            anonymous_id: Some("rs-anon-1"),
            user_id: Some("u-ann"),
            timestamp: Some(T0),
            received_at: Some(T0 + SECOND),
            traits: Some(r#"{"email": "ann@example.com", "plan": "pro"}"#),
            context: Some(r#"{"ip": "10.0.0.1", "traits": {"email": "ann@example.com"}}"#),
            ..Ev::default()
        },
        Ev {
            message_id: Some("m-r2"),
            kind: Some("track"),
            event: Some("Product Viewed"),
            anonymous_id: Some("rs-anon-1"),
            // `_timestamp` comes before `original_timestamp`.
            timestamp: Some(T0 + 60 * SECOND),
            received_at: Some(T0 + 62 * SECOND),
            properties: Some(r#"{"sku": "sku-1", "price": 10}"#),
            context: Some(r#"{"page_path": "/p/1"}"#),
            ..Ev::default()
        },
        Ev {
            message_id: Some("m-r3"),
            kind: Some("track"),
            event: Some("Product Viewed"),
            anonymous_id: Some("rs-anon-1"),
            timestamp: Some(T0 + 120 * SECOND),
            received_at: Some(T0 + 122 * SECOND),
            properties: Some(r#"{"sku": "sku-2", "price": 20}"#),
            context: Some(r#"{"page_path": "/p/2"}"#),
            ..Ev::default()
        },
        Ev {
            message_id: Some("m-r4"),
            kind: Some("page"),
            anonymous_id: Some("rs-anon-2"),
            timestamp: Some(T0 + 3600 * SECOND),
            received_at: Some(T0 + 3601 * SECOND),
            properties: Some(r#"{"name": "Home", "url": "https://shop.example/"}"#),
            context: Some(r#"{"library_name": "rudder-analytics.js"}"#),
            ..Ev::default()
        },
    ]
}

/// A Segment Data Lakes source folder under `root`.
fn segment_datalake(root: &Path) {
    let source = root.join("segment-data/data/src-1");
    write_parquet(
        &source.join("segment_type=identify/day=2026-12-01/hr=10/part-0.parquet"),
        &[batch(vec![
            ("message_id", strs(&[Some("m-s1")])),
            ("anonymous_id", strs(&[Some("sd-anon-1")])),
            ("user_id", strs(&[Some("u-bob")])),
            ("timestamp", times(&[Some(T0 + 10 * SECOND)])),
            ("received_at", times(&[Some(T0 + 11 * SECOND)])),
            ("traits_email", strs(&[Some("bob@example.com")])),
            ("context_ip", strs(&[Some("10.0.0.2")])),
            ("context_library_name", strs(&[Some("analytics.js")])),
        ])],
    );
    write_parquet(
        &source.join("segment_type=order_completed/day=2026-12-01/hr=11/part-0.parquet"),
        &[batch(vec![
            ("message_id", strs(&[Some("m-s2"), Some("m-s3")])),
            (
                "event",
                strs(&[Some("Order Completed"), Some("Order Completed")]),
            ),
            (
                "anonymous_id",
                strs(&[Some("sd-anon-1"), Some("sd-anon-2")]),
            ),
            ("user_id", strs(&[Some("u-bob"), None])),
            (
                "timestamp",
                times(&[Some(T0 + 3600 * SECOND), Some(T0 + 3700 * SECOND)]),
            ),
            (
                "received_at",
                times(&[Some(T0 + 3601 * SECOND), Some(T0 + 3701 * SECOND)]),
            ),
            ("properties_total", floats(&[Some(42.5), Some(7.0)])),
            ("properties_currency", strs(&[Some("EUR"), Some("USD")])),
        ])],
    );
}

fn segment_datalake_as_segment() -> Vec<Ev> {
    vec![
        Ev {
            message_id: Some("m-s1"),
            kind: Some("identify"),
            anonymous_id: Some("sd-anon-1"),
            user_id: Some("u-bob"),
            timestamp: Some(T0 + 10 * SECOND),
            received_at: Some(T0 + 11 * SECOND),
            traits: Some(r#"{"email": "bob@example.com"}"#),
            context: Some(r#"{"ip": "10.0.0.2", "library_name": "analytics.js"}"#),
            ..Ev::default()
        },
        Ev {
            message_id: Some("m-s2"),
            kind: Some("track"),
            event: Some("Order Completed"),
            anonymous_id: Some("sd-anon-1"),
            user_id: Some("u-bob"),
            timestamp: Some(T0 + 3600 * SECOND),
            received_at: Some(T0 + 3601 * SECOND),
            properties: Some(r#"{"total": 42.5, "currency": "EUR"}"#),
            ..Ev::default()
        },
        Ev {
            message_id: Some("m-s3"),
            kind: Some("track"),
            event: Some("Order Completed"),
            anonymous_id: Some("sd-anon-2"),
            timestamp: Some(T0 + 3700 * SECOND),
            received_at: Some(T0 + 3701 * SECOND),
            properties: Some(r#"{"total": 7.0, "currency": "USD"}"#),
            ..Ev::default()
        },
    ]
}

/// One row of the Snowplow fixture.
struct Snow {
    event_id: Option<&'static str>,
    event_name: &'static str,
    event: &'static str,
    user_id: Option<&'static str>,
    domain_userid: Option<&'static str>,
    network_userid: Option<&'static str>,
    derived: Option<i64>,
    collector: Option<i64>,
    page_title: Option<&'static str>,
    cart: Option<(&'static str, i64)>,
    role: Option<&'static str>,
}

/// The canonical event model's columns (the ones these tests use), partitioned as the lake
/// loader partitions: by `load_tstamp_date` and `event_name`.
fn snowplow_batch(rows: &[Snow]) -> RecordBatch {
    let cart_fields = Fields::from(vec![
        Field::new("sku", DataType::Utf8, true),
        Field::new("quantity", DataType::Int64, true),
    ]);
    let cart = StructArray::new(
        cart_fields,
        vec![
            strs(&rows.iter().map(|r| r.cart.map(|c| c.0)).collect::<Vec<_>>()),
            ints(&rows.iter().map(|r| r.cart.map(|c| c.1)).collect::<Vec<_>>()),
        ],
        Some(rows.iter().map(|r| r.cart.is_some()).collect()),
    );
    let role_field = Arc::new(Field::new(
        "item",
        DataType::Struct(Fields::from(vec![Field::new("role", DataType::Utf8, true)])),
        true,
    ));
    let roles = StructArray::new(
        Fields::from(vec![Field::new("role", DataType::Utf8, true)]),
        vec![strs(
            &rows
                .iter()
                .filter_map(|r| r.role.map(Some))
                .collect::<Vec<_>>(),
        )],
        None,
    );
    let contexts = ListArray::new(
        role_field,
        OffsetBuffer::from_lengths(rows.iter().map(|r| usize::from(r.role.is_some()))),
        Arc::new(roles),
        Some(rows.iter().map(|r| r.role.is_some()).collect()),
    );
    let day = 20_423; // 2026-12-01
    batch(vec![
        ("app_id", strs(&vec![Some("shop"); rows.len()])),
        (
            "collector_tstamp",
            times(&rows.iter().map(|r| r.collector).collect::<Vec<_>>()),
        ),
        (
            "event",
            strs(&rows.iter().map(|r| Some(r.event)).collect::<Vec<_>>()),
        ),
        (
            "event_id",
            strs(&rows.iter().map(|r| r.event_id).collect::<Vec<_>>()),
        ),
        (
            "user_id",
            strs(&rows.iter().map(|r| r.user_id).collect::<Vec<_>>()),
        ),
        (
            "domain_userid",
            strs(&rows.iter().map(|r| r.domain_userid).collect::<Vec<_>>()),
        ),
        (
            "network_userid",
            strs(&rows.iter().map(|r| r.network_userid).collect::<Vec<_>>()),
        ),
        ("domain_sessionid", strs(&vec![Some("sess-1"); rows.len()])),
        (
            "page_url",
            strs(&vec![Some("https://shop.example/"); rows.len()]),
        ),
        (
            "page_title",
            strs(&rows.iter().map(|r| r.page_title).collect::<Vec<_>>()),
        ),
        (
            "derived_tstamp",
            times(&rows.iter().map(|r| r.derived).collect::<Vec<_>>()),
        ),
        (
            "load_tstamp",
            times(&vec![Some(T0 + 7200 * SECOND); rows.len()]),
        ),
        ("unstruct_event_com_acme_add_to_cart_1", Arc::new(cart)),
        ("contexts_com_acme_user_1", Arc::new(contexts)),
        (
            "event_name",
            strs(&rows.iter().map(|r| Some(r.event_name)).collect::<Vec<_>>()),
        ),
        (
            "load_tstamp_date",
            Arc::new(Date32Array::from(vec![day; rows.len()])),
        ),
    ])
}

/// Writes `rows` as a Delta table at `dir`, partitioned as the lake loader partitions.
fn snowplow_table(dir: &Path, rows: &[Snow]) {
    std::fs::create_dir_all(dir).unwrap();
    let batch = snowplow_batch(rows);
    let url = url::Url::from_directory_path(dir).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let table = deltalake::DeltaTableBuilder::from_url(url)
            .unwrap()
            .build()
            .unwrap();
        table
            .write(vec![batch])
            .with_partition_columns(["load_tstamp_date", "event_name"])
            .await
            .expect("the Snowplow fixture is written as a Delta table");
    });
}

fn snowplow_rows() -> Vec<Snow> {
    vec![
        Snow {
            event_id: Some("0b1c7a52-0000-4000-8000-000000000001"),
            event_name: "page_view",
            event: "page_view",
            user_id: None,
            domain_userid: Some("sp-dom-1"),
            network_userid: Some("sp-net-1"),
            derived: Some(T0 + 20 * SECOND),
            collector: Some(T0 + 21 * SECOND),
            page_title: Some("Home"),
            cart: None,
            role: Some("guest"),
        },
        Snow {
            event_id: Some("0b1c7a52-0000-4000-8000-000000000002"),
            event_name: "add_to_cart",
            event: "unstruct",
            // The login: the shop sets the user id once the visitor signs in.
            user_id: Some("u-ann"),
            domain_userid: Some("sp-dom-1"),
            network_userid: Some("sp-net-1"),
            // No derived time: the collector's time stands in.
            derived: None,
            collector: Some(T0 + 40 * SECOND),
            page_title: None,
            cart: Some(("sku-1", 2)),
            role: None,
        },
    ]
}

fn snowplow_as_segment() -> Vec<Ev> {
    vec![
        Ev {
            message_id: Some("0b1c7a52-0000-4000-8000-000000000001"),
            kind: Some("page"),
            anonymous_id: Some("sp-dom-1"),
            timestamp: Some(T0 + 20 * SECOND),
            received_at: Some(T0 + 21 * SECOND),
            properties: Some(r#"{"url": "https://shop.example/", "title": "Home"}"#),
            context: Some(
                r#"{"app_id": "shop", "event": "page_view",
                    "page": {"url": "https://shop.example/", "title": "Home"},
                    "contexts_com_acme_user_1": [{"role": "guest"}]}"#,
            ),
            ..Ev::default()
        },
        Ev {
            message_id: Some("0b1c7a52-0000-4000-8000-000000000002"),
            kind: Some("track"),
            event: Some("add_to_cart"),
            anonymous_id: Some("sp-dom-1"),
            user_id: Some("u-ann"),
            timestamp: Some(T0 + 40 * SECOND),
            received_at: Some(T0 + 40 * SECOND),
            properties: Some(r#"{"sku": "sku-1", "quantity": 2}"#),
            context: Some(
                r#"{"app_id": "shop", "event": "unstruct", "page": {"url": "https://shop.example/"}}"#,
            ),
            ..Ev::default()
        },
    ]
}

// ---------------------------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------------------------

/// Parses the JSON-text fields of `row` named in `fields`, so objects compare by content.
fn parse_json(mut row: Value, fields: &[&str]) -> Value {
    for f in fields {
        if let Some(Value::String(text)) = row.get(*f) {
            let parsed: Value = serde_json::from_str(text)
                .unwrap_or_else(|e| panic!("{f} is JSON text ({e}): {text}"));
            row[*f] = parsed;
        }
    }
    row
}

/// `events`, `identity_graph` and `profiles` as a project's queries read them back.
fn tables_of(project: &TempProject) -> Vec<Vec<Value>> {
    let events = project
        .query(
            "SELECT message_id, type, event, anonymous_id, user_id, \
             CAST(\"timestamp\" AS VARCHAR) AS ts, CAST(received_at AS VARCHAR) AS received, \
             traits, properties, context FROM events ORDER BY message_id",
        )
        .into_iter()
        .map(|r| parse_json(r, &["traits", "properties", "context"]))
        .collect();
    let graph = project.query(
        "SELECT identifier_type, identifier_value, profile_id, \
         CAST(first_seen AS VARCHAR) AS first_seen, CAST(last_seen AS VARCHAR) AS last_seen \
         FROM identity_graph ORDER BY identifier_type, identifier_value",
    );
    let profiles = project
        .query(
            "SELECT * EXCEPT (first_seen, last_seen), CAST(first_seen AS VARCHAR) AS first_seen, \
             CAST(last_seen AS VARCHAR) AS last_seen FROM profiles ORDER BY profile_id",
        )
        .into_iter()
        .map(|r| parse_json(r, &["traits"]))
        .collect();
    vec![events, graph, profiles]
}

/// A Segment-spec project holding `events`, run.
fn segment_project(events: &[Ev]) -> TempProject {
    let project = TempProject::local();
    write_parquet(
        &project.events().join("events.parquet"),
        &[events_batch(events)],
    );
    project.run_json();
    project
}

fn assert_same_tables(format: &str, got: &TempProject, want: &TempProject) {
    let (got, want) = (tables_of(got), tables_of(want));
    for (i, name) in ["events", "identity_graph", "profiles"].iter().enumerate() {
        assert!(!want[i].is_empty(), "the Segment-spec project has {name}");
        assert_eq!(
            got[i], want[i],
            "{format}: `{name}` differs from the Segment-spec project's"
        );
    }
}

fn skipped(report: &Value) -> Vec<(String, String)> {
    report["skipped_files"]
        .as_array()
        .expect("skipped_files is a list")
        .iter()
        .map(|s| {
            (
                s["file"].as_str().unwrap_or_default().to_string(),
                s["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn rudderstack_lake_reads_as_the_same_events_and_profiles_as_segment_spec() {
    let project = TempProject::new(
        "[storage]\nevents = \"lake\"\nevents_format = \"rudderstack\"\noutput = \"out\"\n",
    );
    rudderstack_lake(&project.path().join("lake"));
    let report = project.run_json();
    assert!(skipped(&report).is_empty(), "{report}");
    let want = segment_project(&rudderstack_as_segment());
    assert_same_tables("rudderstack", &project, &want);
}

#[test]
fn segment_data_lake_reads_as_the_same_events_and_profiles_as_segment_spec() {
    let project = TempProject::new(
        "[storage]\nevents = \"lake/segment-data/data/src-1\"\nevents_format = \"segment_datalake\"\noutput = \"out\"\n",
    );
    segment_datalake(&project.path().join("lake"));
    let report = project.run_json();
    assert!(skipped(&report).is_empty(), "{report}");
    let want = segment_project(&segment_datalake_as_segment());
    assert_same_tables("segment_datalake", &project, &want);
}

/// Three sources in three formats beside an empty Segment-spec events folder: together they
/// make the same tables as their Segment-spec equivalents, a Snowplow cookie and a RudderStack
/// anonymous id share a profile through the login's user id, an identity query reads
/// `network_userid`, and each source's own columns stay queryable under its name.
#[test]
fn sources_in_every_format_join_one_history_and_link_across_formats() {
    let identity = r#"
[identity]
identifiers = [
  { name = "user_id", limit = 1 },
  { name = "email", normalize = "email" },
  { name = "phone", normalize = "phone" },
  { name = "anonymous_id" },
  { name = "network_userid" },
]
"#;
    let config = format!(
        "[storage]\nevents = \"data/events\"\noutput = \"out\"\n{identity}\n\
         [[sources]]\nname = \"snow\"\nlocation = \"lakes/snowplow\"\nformat = \"snowplow\"\n\n\
         [[sources]]\nname = \"rudder\"\nlocation = \"lakes/rudder/rudder-datalake/web/identifies\"\nformat = \"rudderstack\"\n\n\
         [[sources]]\nname = \"sdl\"\nlocation = \"lakes/sdl/segment-data/data/src-1\"\nformat = \"segment_datalake\"\n"
    );
    let project = TempProject::new(&config);
    std::fs::create_dir_all(project.events()).unwrap();
    snowplow_table(&project.path().join("lakes/snowplow"), &snowplow_rows());
    rudderstack_lake(&project.path().join("lakes/rudder"));
    segment_datalake(&project.path().join("lakes/sdl"));

    // The equivalent Segment-spec project: the same identity rules and queries, and
    // `network_userid` as a column of its own, as Segment-spec files can carry it.
    let want = TempProject::new(&format!(
        "[storage]\nevents = \"data/events\"\noutput = \"out\"\n{identity}"
    ));
    let default_query =
        std::fs::read_to_string(crate::common::repo().join("queries/identity/events.sql")).unwrap();
    // The Snowplow cookies, linked to each other and to the user id on the same event.
    let network = "SELECT message_id, network_userid, anonymous_id, user_id, \
                   \"timestamp\" AS seen_at FROM events WHERE network_userid IS NOT NULL\n";
    for p in [project.path(), want.path()] {
        std::fs::create_dir_all(p.join("queries/identity")).unwrap();
        std::fs::write(p.join("queries/identity/events.sql"), &default_query).unwrap();
        std::fs::write(p.join("queries/identity/snowplow.sql"), network).unwrap();
    }
    let report = project.run_json();
    assert!(skipped(&report).is_empty(), "{report}");

    let mut want_events = snowplow_as_segment();
    want_events.push(rudderstack_as_segment().remove(0));
    want_events.extend(segment_datalake_as_segment());
    let plain = events_batch(&want_events);
    let network_ids: Vec<Option<&str>> = want_events
        .iter()
        .map(|e| {
            e.anonymous_id
                .filter(|a| a.starts_with("sp-"))
                .map(|_| "sp-net-1")
        })
        .collect();
    let mut columns = plain.columns().to_vec();
    columns.push(strs(&network_ids));
    let mut fields: Vec<Field> = plain
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new("network_userid", DataType::Utf8, true));
    let with_network = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
    write_parquet(&want.events().join("events.parquet"), &[with_network]);
    want.run_json();
    assert_same_tables(
        "snowplow, rudderstack and segment_datalake sources",
        &project,
        &want,
    );

    // One person across the formats.
    let profiles = project.query(
        "SELECT identifier_type || ':' || identifier_value AS id, profile_id FROM identity_graph \
         WHERE identifier_value IN ('sp-dom-1', 'sp-net-1', 'rs-anon-1', 'u-ann') ORDER BY id",
    );
    let ids: Vec<&str> = profiles.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [
            "anonymous_id:rs-anon-1",
            "anonymous_id:sp-dom-1",
            "network_userid:sp-net-1",
            "user_id:u-ann"
        ]
    );
    assert!(
        profiles.iter().all(|r| r["profile_id"] == profiles[0]["profile_id"]),
        "a Snowplow cookie and a RudderStack anonymous id linked by one login share a profile: {profiles:?}"
    );

    // The sources' own columns, as SQL tables of their own.
    let snow = project.query(
        "SELECT event_id, unstruct_event_com_acme_add_to_cart_1['sku'] AS sku, event_name \
         FROM snow WHERE event_name = 'add_to_cart'",
    );
    assert_eq!(snow.len(), 1, "{snow:?}");
    assert_eq!(snow[0]["sku"], json!("sku-1"));
    let rudder = project.query("SELECT id, email, context_traits_email FROM rudder");
    assert_eq!(
        rudder,
        [
            json!({"id": "m-r1", "email": "ann@example.com", "context_traits_email": "ann@example.com"})
        ]
    );
}

/// Each format's broken inputs: a file missing a required column, a column of the wrong type
/// and a corrupt file are skipped with a reason naming the column; rows missing their id or
/// time are quarantined with their file.
#[test]
fn broken_inputs_of_each_format_are_skipped_or_quarantined_with_reasons() {
    let project = TempProject::new(
        "[storage]\nevents = \"snowplow\"\nevents_format = \"snowplow\"\noutput = \"out\"\n\n\
         [[sources]]\nname = \"snow_bad\"\nlocation = \"snowplow_bad\"\nformat = \"snowplow\"\n\n\
         [[sources]]\nname = \"rudder\"\nlocation = \"rudder\"\nformat = \"rudderstack\"\n\n\
         [[sources]]\nname = \"sdl\"\nlocation = \"sdl\"\nformat = \"segment_datalake\"\n",
    );
    let root = project.path();

    // Snowplow: one good event, one without any time, and a second table without event_id.
    let mut rows = snowplow_rows();
    rows[1].derived = None;
    rows[1].collector = None;
    snowplow_table(&root.join("snowplow"), &rows);
    let mut no_id = snowplow_batch(&snowplow_rows()[..1]);
    no_id.remove_column(no_id.schema().index_of("event_id").unwrap());
    std::fs::create_dir_all(root.join("snowplow_bad")).unwrap();
    let url = url::Url::from_directory_path(root.join("snowplow_bad")).unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        deltalake::DeltaTableBuilder::from_url(url)
            .unwrap()
            .build()
            .unwrap()
            .write(vec![no_id])
            .with_partition_columns(["load_tstamp_date", "event_name"])
            .await
            .unwrap();
    });

    // RudderStack: a good identify with a row missing its id, a file without `id`, a file
    // whose `user_id` is a number, and a file that is not Parquet.
    let rudder = root.join("rudder/rudder-datalake/web");
    write_parquet(
        &rudder.join("identifies/2026/12/01/10/good.parquet"),
        &[batch(vec![
            ("id", strs(&[Some("m-r1"), None])),
            (
                "anonymous_id",
                strs(&[Some("rs-anon-1"), Some("rs-anon-9")]),
            ),
            ("timestamp", times(&[Some(T0), Some(T0)])),
        ])],
    );
    write_parquet(
        &rudder.join("identifies/2026/12/01/11/no_id.parquet"),
        &[batch(vec![
            ("anonymous_id", strs(&[Some("rs-anon-1")])),
            ("timestamp", times(&[Some(T0)])),
        ])],
    );
    write_parquet(
        &rudder.join("pages/2026/12/01/10/numeric_user.parquet"),
        &[batch(vec![
            ("id", strs(&[Some("m-r5")])),
            ("user_id", ints(&[Some(42)])),
            ("timestamp", times(&[Some(T0)])),
        ])],
    );
    let corrupt = rudder.join("pages/2026/12/01/12/corrupt.parquet");
    std::fs::create_dir_all(corrupt.parent().unwrap()).unwrap();
    std::fs::write(&corrupt, b"PAR1 this is not a parquet file PAR1").unwrap();

    // Segment Data Lakes: a file with no time column at all, and a truncated file.
    let sdl = root.join("sdl");
    write_parquet(
        &sdl.join("segment_type=identify/day=2026-12-01/hr=10/no_time.parquet"),
        &[batch(vec![
            ("message_id", strs(&[Some("m-s1")])),
            ("anonymous_id", strs(&[Some("sd-anon-1")])),
        ])],
    );
    let truncated = sdl.join("segment_type=page/day=2026-12-01/hr=10/truncated.parquet");
    write_parquet(
        &truncated,
        &[batch(vec![
            ("message_id", strs(&[Some("m-s9")])),
            ("timestamp", times(&[Some(T0)])),
        ])],
    );
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();

    let report = project.run_json();
    let skipped = skipped(&report);
    let reason_for = |file: &str| -> String {
        skipped
            .iter()
            .find(|(f, _)| f.ends_with(file))
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| panic!("{file} is reported as skipped: {skipped:?}"))
    };
    let no_event_id = skipped
        .iter()
        .find(|(f, _)| f.contains("/snowplow_bad/"))
        .map(|(_, r)| r.clone())
        .unwrap_or_else(|| panic!("the table without event_id is skipped: {skipped:?}"));
    assert!(
        no_event_id.contains("snowplow") && no_event_id.contains("`event_id`"),
        "{no_event_id}"
    );
    let r = reason_for("identifies/2026/12/01/11/no_id.parquet");
    assert!(r.contains("rudderstack") && r.contains("`id`"), "{r}");
    let r = reason_for("pages/2026/12/01/10/numeric_user.parquet");
    assert!(r.contains("`user_id`") && r.contains("Int64"), "{r}");
    let r = reason_for("pages/2026/12/01/12/corrupt.parquet");
    assert!(r.contains("not a readable Parquet file"), "{r}");
    let r = reason_for("hr=10/no_time.parquet");
    assert!(
        r.contains("segment_datalake") && r.contains("no time column"),
        "{r}"
    );
    let r = reason_for("hr=10/truncated.parquet");
    assert!(r.contains("not a readable Parquet file"), "{r}");
    assert_eq!(skipped.len(), 6, "{skipped:?}");

    let rejected = project.query("SELECT reason, source_file FROM rejected_events ORDER BY reason");
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert_eq!(rejected[0]["reason"], json!("missing message_id"));
    assert!(rejected[0]["source_file"]
        .as_str()
        .unwrap()
        .ends_with("identifies/2026/12/01/10/good.parquet"));
    assert_eq!(rejected[1]["reason"], json!("missing timestamp"));
    assert!(
        rejected[1]["source_file"]
            .as_str()
            .unwrap()
            .contains("event_name=add_to_cart"),
        "{rejected:?}"
    );
    let events = project.query("SELECT message_id FROM events ORDER BY message_id");
    assert_eq!(
        events,
        [
            json!({"message_id": "0b1c7a52-0000-4000-8000-000000000001"}),
            json!({"message_id": "m-r1"})
        ]
    );
    let _ = ok(run(&mut project.cmd(&["status"])));
}

/// The Snowplow table is read through its Delta log: a later commit's file is read by the next
/// (incremental) run, files already read are not read again, and a Parquet file in the table's
/// folders that the log does not hold (left behind by a compaction or a failed write) is never
/// read.
#[test]
fn snowplow_reads_the_files_its_delta_log_holds_run_after_run() {
    let project = TempProject::new(
        "[storage]\nevents = \"snowplow\"\nevents_format = \"snowplow\"\noutput = \"out\"\n",
    );
    let table = project.path().join("snowplow");
    let rows = snowplow_rows();
    let (first, second) = rows.split_at(1);
    snowplow_table(&table, first);
    let report = project.run_json();
    assert_eq!(report["events"], json!(1), "{report}");

    let url = url::Url::from_directory_path(&table).unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        deltalake::DeltaTableBuilder::from_url(url)
            .unwrap()
            .load()
            .await
            .unwrap()
            .write(vec![snowplow_batch(second)])
            .with_partition_columns(["load_tstamp_date", "event_name"])
            .await
            .unwrap();
    });
    // A file the log does not hold, with an event of its own.
    let orphan = Snow {
        event_id: Some("0b1c7a52-0000-4000-8000-00000000dead"),
        ..snowplow_rows().remove(0)
    };
    let mut orphan_batch = snowplow_batch(&[orphan]);
    for partition in ["event_name", "load_tstamp_date"] {
        orphan_batch.remove_column(orphan_batch.schema().index_of(partition).unwrap());
    }
    write_parquet(
        &table.join("load_tstamp_date=2026-12-01/event_name=page_view/part-orphan.parquet"),
        &[orphan_batch],
    );

    let again = project.run_json();
    assert_eq!(again["mode"], json!("incremental"), "{again}");
    assert_eq!(again["new_events"], json!(1), "{again}");
    let ids = project.query("SELECT message_id FROM events ORDER BY message_id");
    assert_eq!(
        ids,
        [
            json!({"message_id": "0b1c7a52-0000-4000-8000-000000000001"}),
            json!({"message_id": "0b1c7a52-0000-4000-8000-000000000002"})
        ]
    );
}
