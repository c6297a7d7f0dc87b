//! Synthetic Segment-spec events with a known truth, for the sample project, tests and benchmarks.
//!
//! People browse on several devices, sign up, log in, type their email with stray capitals and
//! spaces, buy things; a few newsletter sign-ups never log in; a broken SDK sends one constant
//! anonymous_id; some events are redelivered exactly and a few are malformed. `truth.parquet`
//! says which person every identifier that appears belongs to, so identity accuracy can be
//! measured. Everything derives from the seed: the same seed gives the same rows.
//!
//! Memory stays bounded at any size: days are generated one after another, people within a day
//! in order, and rows go to a new file every `rows_per_file` rows.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::NaiveDate;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::Result;
use crate::progress::Progress;
use crate::storage::Place;
use crate::tables::timestamp_type;

/// The anonymous_id a broken SDK sends for everyone.
pub const JUNK_ANONYMOUS_ID: &str = "00000000-0000-0000-0000-000000000000";
/// The email people type into forms to get past them.
pub const JUNK_EMAIL: &str = "test@test.com";

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// How many people.
    pub people: u64,
    /// How many days of events.
    pub days: u32,
    /// The seed; the same seed gives the same rows.
    pub seed: u64,
    /// The first day.
    pub start: NaiveDate,
    /// Rows per Parquet file at most.
    pub rows_per_file: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            people: 1000,
            days: 30,
            seed: 42,
            start: NaiveDate::from_ymd_opt(2026, 10, 1).expect("valid date"),
            rows_per_file: 250_000,
        }
    }
}

/// What was generated.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GenerateSummary {
    /// Event rows written, copies and malformed rows included.
    pub rows: u64,
    /// Rows that are exact copies of an earlier row (redeliveries).
    pub duplicates: u64,
    /// Rows that break a row check on purpose.
    pub malformed: u64,
    /// Event files written.
    pub files: u64,
    /// Rows of `truth.parquet`.
    pub truth_rows: u64,
}

const FIRST: &[&str] = &[
    "ada",
    "alan",
    "grace",
    "linus",
    "margaret",
    "dennis",
    "barbara",
    "ken",
    "frances",
    "edsger",
    "radia",
    "tim",
    "hedy",
    "john",
    "katherine",
    "donald",
    "sophie",
    "claude",
    "annie",
    "niklaus",
    "joan",
    "james",
    "mary",
    "robert",
    "lin",
    "wei",
    "amara",
    "kofi",
    "ines",
    "mateo",
    "yuki",
    "omar",
];
const LAST: &[&str] = &[
    "lovelace", "turing", "hopper", "torvalds", "hamilton", "ritchie", "liskov", "thompson",
    "allen", "dijkstra", "perlman", "berners", "lamarr", "backus", "johnson", "knuth", "wilson",
    "shannon", "easley", "wirth", "clarke", "gosling", "keller", "tarjan", "chen", "zhang",
    "okafor", "mensah", "garcia", "silva", "tanaka", "haddad",
];
const DOMAINS: &[&str] = &[
    "example.com",
    "mail.example",
    "inbox.test",
    "post.example.org",
];
const CATEGORIES: &[&str] = &["shoes", "shirts", "bags", "hats", "books", "games"];
const SOURCES: &[(&str, &str)] = &[
    ("google", "cpc"),
    ("newsletter", "email"),
    ("facebook", "social"),
    ("partner", "referral"),
];

fn mix(mut x: u64) -> u64 {
    // splitmix64: a fast, well-spread hash of a counter.
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn seed_for(seed: u64, person: u64, day: u64) -> u64 {
    mix(mix(seed ^ mix(person)) ^ day.wrapping_mul(0xA24B_AED4_963E_E407))
}

fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

fn uuid(rng: &mut ChaCha8Rng) -> String {
    let a: u128 = rng.gen();
    let h = format!("{a:032x}");
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// One person's fixed attributes, derived from the seed alone.
struct Person {
    index: u64,
    first: &'static str,
    last: &'static str,
    email: Option<String>,
    user_id: Option<String>,
    /// Day of sign-up (account holders) or newsletter sign-up (email without account).
    signup_day: u32,
    phone: Option<String>,
    /// Devices: anonymous_id and first day used.
    devices: Vec<(String, u32)>,
    activity: f64,
    buyer: f64,
    /// The person whose first device this one sometimes borrows (a shared family tablet).
    borrows_from: Option<u64>,
}

impl Person {
    fn new(seed: u64, index: u64, days: u32) -> Person {
        let mut rng = ChaCha8Rng::seed_from_u64(seed_for(seed, index, u64::MAX));
        let first = FIRST[rng.gen_range(0..FIRST.len())];
        let last = LAST[rng.gen_range(0..LAST.len())];
        let ndev = 1 + usize::from(rng.gen_bool(0.45)) + usize::from(rng.gen_bool(0.15));
        let first_day = rng.gen_range(0..days.div_ceil(2).max(1));
        let mut devices = vec![(uuid(&mut rng), first_day)];
        for _ in 1..ndev {
            devices.push((
                uuid(&mut rng),
                rng.gen_range(first_day..days.max(first_day + 1)),
            ));
        }
        let has_account = rng.gen_bool(0.7);
        let newsletter = !has_account && rng.gen_bool(0.25);
        let domain = DOMAINS[rng.gen_range(0..DOMAINS.len())];
        let email = (has_account || newsletter).then(|| format!("{first}.{last}.{index}@{domain}"));
        let user_id = has_account.then(|| format!("usr_{index:07}"));
        let signup_day = rng.gen_range(first_day..days.max(first_day + 1));
        let phone = (has_account && rng.gen_bool(0.4)).then(|| {
            let area = 201 + (index / 8_000_000) % 700;
            let local = 2_000_000 + (index % 8_000_000) * 7919 % 8_000_000;
            format!("+1{area}{local:07}")
        });
        let u: f64 = rng.gen();
        let activity = 0.04 + 0.4 * u * u;
        let buyer = rng.gen_range(0.1..0.9);
        let borrows_from = (index > 0 && rng.gen_bool(0.01)).then(|| index - 1);
        Person {
            index,
            first,
            last,
            email,
            user_id,
            signup_day,
            phone,
            devices,
            activity,
            buyer,
            borrows_from,
        }
    }
}

/// Marks of which identifiers of a person appeared in events (for the truth).
const SEEN_USER_ID: u8 = 1;
const SEEN_EMAIL: u8 = 2;
const SEEN_PHONE: u8 = 4;
const SEEN_DEVICE: u8 = 8; // devices use bits 3, 4, 5

/// Column buffers for one file of events.
#[derive(Default)]
struct Rows {
    message_id: Vec<Option<String>>,
    kind: Vec<Option<String>>,
    event: Vec<Option<String>>,
    anonymous_id: Vec<Option<String>>,
    user_id: Vec<Option<String>>,
    timestamp: Vec<Option<i64>>,
    received_at: Vec<Option<i64>>,
    traits: Vec<Option<String>>,
    properties: Vec<Option<String>>,
    context: Vec<Option<String>>,
}

struct Row {
    message_id: Option<String>,
    kind: String,
    event: Option<String>,
    anonymous_id: Option<String>,
    user_id: Option<String>,
    timestamp: Option<i64>,
    received_at: i64,
    traits: Option<String>,
    properties: Option<String>,
    context: Option<String>,
}

impl Rows {
    fn len(&self) -> usize {
        self.message_id.len()
    }

    fn push(&mut self, r: Row) {
        self.message_id.push(r.message_id);
        self.kind.push(Some(r.kind));
        self.event.push(r.event);
        self.anonymous_id.push(r.anonymous_id);
        self.user_id.push(r.user_id);
        self.timestamp.push(r.timestamp);
        self.received_at.push(Some(r.received_at));
        self.traits.push(r.traits);
        self.properties.push(r.properties);
        self.context.push(r.context);
    }

    fn copy_of_last(&self) -> Row {
        let i = self.len() - 1;
        Row {
            message_id: self.message_id[i].clone(),
            kind: self.kind[i].clone().unwrap_or_default(),
            event: self.event[i].clone(),
            anonymous_id: self.anonymous_id[i].clone(),
            user_id: self.user_id[i].clone(),
            timestamp: self.timestamp[i],
            received_at: self.received_at[i].unwrap_or_default(),
            traits: self.traits[i].clone(),
            properties: self.properties[i].clone(),
            context: self.context[i].clone(),
        }
    }

    fn take_batch(&mut self) -> Result<RecordBatch> {
        let taken = std::mem::take(self);
        let s = |v: Vec<Option<String>>| Arc::new(StringArray::from(v)) as ArrayRef;
        let t = |v: Vec<Option<i64>>| {
            Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC")) as ArrayRef
        };
        Ok(RecordBatch::try_new(
            event_schema(),
            vec![
                s(taken.message_id),
                s(taken.kind),
                s(taken.event),
                s(taken.anonymous_id),
                s(taken.user_id),
                t(taken.timestamp),
                t(taken.received_at),
                s(taken.traits),
                s(taken.properties),
                s(taken.context),
            ],
        )?)
    }
}

/// The schema of generated event files (the Segment-spec columns).
pub fn event_schema() -> SchemaRef {
    let s = |n: &str| Field::new(n, DataType::Utf8, true);
    Arc::new(Schema::new(vec![
        s("message_id"),
        s("type"),
        s("event"),
        s("anonymous_id"),
        s("user_id"),
        Field::new("timestamp", timestamp_type(), true),
        Field::new("received_at", timestamp_type(), true),
        s("traits"),
        s("properties"),
        s("context"),
    ]))
}

/// The schema of `truth.parquet`.
pub fn truth_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("identifier_type", DataType::Utf8, false),
        Field::new("identifier_value", DataType::Utf8, false),
        Field::new("person", DataType::Int64, false),
    ]))
}

/// Encodes batches as one Parquet file in memory.
pub fn parquet_bytes(schema: SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>> {
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
        .build();
    let mut buffer = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut buffer, schema, Some(props))?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.close()?;
    Ok(buffer)
}

/// How a person typed their email this time.
fn typed_email(rng: &mut ChaCha8Rng, email: &str) -> String {
    let mut typed = match rng.gen_range(0..20) {
        0..=2 => capitalise_words(email),
        3 => email.to_uppercase(),
        _ => email.to_string(),
    };
    if rng.gen_bool(0.1) {
        typed = format!(" {typed} ");
    }
    typed
}

fn capitalise_words(email: &str) -> String {
    let mut out = String::with_capacity(email.len());
    let mut start = true;
    for c in email.chars() {
        out.push(if start { c.to_ascii_uppercase() } else { c });
        start = matches!(c, '.' | '@');
    }
    out
}

/// How a person typed their phone number this time (all normalise to the same E.164).
fn typed_phone(rng: &mut ChaCha8Rng, e164: &str) -> String {
    let d = &e164[2..];
    match rng.gen_range(0..4) {
        0 => format!("+1 ({}) {}-{}", &d[0..3], &d[3..6], &d[6..10]),
        1 => format!("{}.{}.{}", &d[0..3], &d[3..6], &d[6..10]),
        2 => format!("({}) {}-{}", &d[0..3], &d[3..6], &d[6..10]),
        _ => e164.to_string(),
    }
}

/// Generates one person's events for one day into `rows`; marks identifiers seen.
struct DayWriter<'a> {
    seed: u64,
    day: u32,
    day_start_us: i64,
    rows: &'a mut Rows,
    summary: &'a mut GenerateSummary,
    pending_copies: &'a mut Vec<Row>,
}

impl DayWriter<'_> {
    fn person(&mut self, p: &Person, partner: Option<&Person>, seen: &mut [u8]) {
        let day = self.day;
        let first_day = p.devices[0].1;
        if day < first_day {
            return;
        }
        let key = seed_for(self.seed, p.index, day as u64);
        let signs_up = (p.user_id.is_some() || p.email.is_some()) && day == p.signup_day;
        if !signs_up && unit(key) >= p.activity {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(key);
        let sessions = 1 + usize::from(rng.gen_bool(0.3));
        let mut clock = self.day_start_us + rng.gen_range(0..20 * 3600) as i64 * 1_000_000;
        for session in 0..sessions {
            let devices: Vec<usize> = (0..p.devices.len())
                .filter(|&i| p.devices[i].1 <= day)
                .collect();
            let device = devices[rng.gen_range(0..devices.len())];
            let mut anon = p.devices[device].0.clone();
            let mut anon_owner = Some((p.index, device));
            if let (Some(q), true) = (partner, rng.gen_bool(0.3)) {
                if q.devices[0].1 <= day {
                    anon = q.devices[0].0.clone();
                    anon_owner = Some((q.index, 0));
                }
            }
            if rng.gen_bool(0.003) {
                anon = JUNK_ANONYMOUS_ID.to_string();
                anon_owner = None;
            }
            let signup_session = signs_up && session == 0;
            let logged_in = p.user_id.is_some()
                && (signup_session || (day > p.signup_day && rng.gen_bool(0.6)));
            let mut user = logged_in.then(|| p.user_id.clone()).flatten();
            if user.is_some() && rng.gen_bool(0.001) {
                user = Some(String::new());
            }
            let campaign = rng
                .gen_bool(0.4)
                .then(|| SOURCES[rng.gen_range(0..SOURCES.len())]);
            let mut ctx = SessionCtx {
                anon,
                anon_owner,
                user,
                campaign,
            };

            self.emit_page(
                &mut rng,
                &mut clock,
                &mut ctx,
                if signup_session { "/signup" } else { "/" },
                p,
                seen,
            );
            if signup_session {
                let traits = self.signup_traits(&mut rng, p, seen, ctx.user.is_some());
                self.emit(
                    &mut rng,
                    &mut clock,
                    &ctx,
                    "identify",
                    None,
                    Some(traits),
                    None,
                    p,
                    seen,
                );
                if ctx.user.is_some() {
                    self.emit(
                        &mut rng,
                        &mut clock,
                        &ctx,
                        "track",
                        Some("Signed Up"),
                        None,
                        Some("{}".into()),
                        p,
                        seen,
                    );
                }
            } else if ctx.user.is_some() && rng.gen_bool(0.5) {
                let traits = match (&p.email, rng.gen_bool(0.5)) {
                    (Some(email), true) => {
                        seen[p.index as usize] |= SEEN_EMAIL;
                        format!(r#"{{"email":"{}"}}"#, typed_email(&mut rng, email))
                    }
                    _ => "{}".to_string(),
                };
                self.emit(
                    &mut rng,
                    &mut clock,
                    &ctx,
                    "identify",
                    None,
                    Some(traits),
                    None,
                    p,
                    seen,
                );
            }
            let pages = rng.gen_range(0..4);
            for _ in 0..pages {
                let path = format!("/c/{}", CATEGORIES[rng.gen_range(0..CATEGORIES.len())]);
                self.emit_page(&mut rng, &mut clock, &mut ctx, &path, p, seen);
            }
            let views = rng.gen_range(0..4);
            let mut cart: Option<(u32, f64)> = None;
            for _ in 0..views {
                let product = rng.gen_range(1..200u32);
                let price = 5.0 + (product % 40) as f64 * 2.5;
                let props = format!(
                    r#"{{"product_id":"p{product}","category":"{}","price":{price:.2}}}"#,
                    CATEGORIES[product as usize % CATEGORIES.len()]
                );
                self.emit(
                    &mut rng,
                    &mut clock,
                    &ctx,
                    "track",
                    Some("Product Viewed"),
                    None,
                    Some(props.clone()),
                    p,
                    seen,
                );
                if cart.is_none() && rng.gen_bool(0.3) {
                    self.emit(
                        &mut rng,
                        &mut clock,
                        &ctx,
                        "track",
                        Some("Product Added"),
                        None,
                        Some(props),
                        p,
                        seen,
                    );
                    cart = Some((product, price));
                }
            }
            if let Some((product, price)) = cart {
                if rng.gen_bool(0.6) {
                    let props = format!(r#"{{"product_id":"p{product}","value":{price:.2}}}"#);
                    self.emit(
                        &mut rng,
                        &mut clock,
                        &ctx,
                        "track",
                        Some("Checkout Started"),
                        None,
                        Some(props),
                        p,
                        seen,
                    );
                    if rng.gen_bool(p.buyer) && (ctx.user.is_some() || rng.gen_bool(0.3)) {
                        let quantity = rng.gen_range(1..4);
                        let revenue = price * quantity as f64;
                        let order = rng.gen_range(0..u32::MAX);
                        let props = format!(
                            r#"{{"order_id":"o{order:08x}","revenue":{revenue:.2},"currency":"USD","products":[{{"product_id":"p{product}","quantity":{quantity}}}]}}"#
                        );
                        self.emit(
                            &mut rng,
                            &mut clock,
                            &ctx,
                            "track",
                            Some("Order Completed"),
                            None,
                            Some(props),
                            p,
                            seen,
                        );
                    }
                }
            }
            clock += rng.gen_range(1800..4 * 3600) as i64 * 1_000_000;
        }
    }

    fn signup_traits(
        &self,
        rng: &mut ChaCha8Rng,
        p: &Person,
        seen: &mut [u8],
        account: bool,
    ) -> String {
        let email = match &p.email {
            Some(_) if rng.gen_bool(0.004) => JUNK_EMAIL.to_string(),
            Some(email) => {
                seen[p.index as usize] |= SEEN_EMAIL;
                typed_email(rng, email)
            }
            None => String::new(),
        };
        let mut traits = format!(
            r#"{{"email":"{email}","first_name":"{}","last_name":"{}""#,
            capitalise_words(p.first),
            capitalise_words(p.last)
        );
        if account {
            let plan = ["free", "plus", "pro"][rng.gen_range(0..3)];
            traits.push_str(&format!(r#","plan":"{plan}""#));
        }
        if let Some(phone) = &p.phone {
            seen[p.index as usize] |= SEEN_PHONE;
            traits.push_str(&format!(r#","phone":"{}""#, typed_phone(rng, phone)));
        }
        traits.push('}');
        traits
    }

    fn emit_page(
        &mut self,
        rng: &mut ChaCha8Rng,
        clock: &mut i64,
        ctx: &mut SessionCtx,
        path: &str,
        p: &Person,
        seen: &mut [u8],
    ) {
        let props = format!(r#"{{"path":"{path}","title":"Shop {path}"}}"#);
        self.emit_with_page(rng, clock, ctx, path, props, p, seen);
        ctx.campaign = None;
    }

    #[allow(clippy::too_many_arguments)]
    fn emit_with_page(
        &mut self,
        rng: &mut ChaCha8Rng,
        clock: &mut i64,
        ctx: &SessionCtx,
        path: &str,
        props: String,
        p: &Person,
        seen: &mut [u8],
    ) {
        self.emit_full(
            rng,
            clock,
            ctx,
            "page",
            None,
            None,
            Some(props),
            Some(path),
            p,
            seen,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn emit(
        &mut self,
        rng: &mut ChaCha8Rng,
        clock: &mut i64,
        ctx: &SessionCtx,
        kind: &str,
        event: Option<&str>,
        traits: Option<String>,
        props: Option<String>,
        p: &Person,
        seen: &mut [u8],
    ) {
        self.emit_full(rng, clock, ctx, kind, event, traits, props, None, p, seen);
    }

    #[allow(clippy::too_many_arguments)]
    fn emit_full(
        &mut self,
        rng: &mut ChaCha8Rng,
        clock: &mut i64,
        ctx: &SessionCtx,
        kind: &str,
        event: Option<&str>,
        traits: Option<String>,
        properties: Option<String>,
        page: Option<&str>,
        p: &Person,
        seen: &mut [u8],
    ) {
        *clock += rng.gen_range(5..180) as i64 * 1_000_000;
        let mut context = String::from(r#"{"library":{"name":"analytics.js","version":"5.2.0"}"#);
        if let Some(path) = page {
            context.push_str(&format!(
                r#","page":{{"path":"{path}","url":"https://shop.example.com{path}"}}"#
            ));
        }
        if let Some((source, medium)) = ctx.campaign {
            context.push_str(&format!(
                r#","campaign":{{"source":"{source}","medium":"{medium}"}}"#
            ));
        }
        context.push('}');
        let delay = if rng.gen_bool(0.01) {
            rng.gen_range(3600..86_400)
        } else {
            rng.gen_range(0..3)
        } as i64
            * 1_000_000;
        let mut row = Row {
            message_id: Some(uuid(rng)),
            kind: kind.to_string(),
            event: event.map(str::to_string),
            anonymous_id: Some(ctx.anon.clone()),
            user_id: ctx.user.clone(),
            timestamp: Some(*clock),
            received_at: *clock + delay,
            traits,
            properties,
            context: Some(context),
        };
        if rng.gen_bool(0.0005) {
            // A malformed row, on purpose: each kind of row check gets exercised.
            self.summary.malformed += 1;
            match rng.gen_range(0..4) {
                0 => row.properties = Some(r#"{"revenue": 12.5"#.into()),
                1 => row.kind = "Track".into(),
                2 => row.message_id = None,
                _ => row.timestamp = None,
            }
        } else {
            if let Some((owner, device)) = ctx.anon_owner {
                seen[owner as usize] |= SEEN_DEVICE << device;
            }
            if ctx.user.as_deref().is_some_and(|u| !u.is_empty()) {
                seen[p.index as usize] |= SEEN_USER_ID;
            }
        }
        self.rows.push(row);
        self.summary.rows += 1;
        if rng.gen_bool(0.004) {
            // Redelivered later, byte for byte.
            self.pending_copies.push(self.rows.copy_of_last());
        }
    }
}

struct SessionCtx {
    anon: String,
    anon_owner: Option<(u64, usize)>,
    user: Option<String>,
    campaign: Option<(&'static str, &'static str)>,
}

/// Generates events under `<out>/events/date=…/part-N.parquet` and `<out>/truth.parquet`.
pub async fn generate(
    out: &Place,
    options: &GenerateOptions,
    progress: Progress,
) -> Result<GenerateSummary> {
    let mut summary = GenerateSummary::default();
    let people = options.people;
    let mut seen = vec![0u8; people as usize];
    let mut pending: Vec<Row> = Vec::new();
    let bar = progress.bar("generating days", options.days as u64);
    let day0 = options
        .start
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc()
        .timestamp_micros();
    for day in 0..options.days {
        let date = options.start + chrono::Days::new(day as u64);
        let folder = out.child("events").join(format!("date={date}"));
        let mut rows = Rows::default();
        for copy in pending.drain(..) {
            rows.push(copy);
            summary.rows += 1;
            summary.duplicates += 1;
        }
        let mut part = 0usize;
        for index in 0..people {
            let person = Person::new(options.seed, index, options.days);
            let partner = person
                .borrows_from
                .map(|q| Person::new(options.seed, q, options.days));
            let mut w = DayWriter {
                seed: options.seed,
                day,
                day_start_us: day0 + day as i64 * 86_400_000_000,
                rows: &mut rows,
                summary: &mut summary,
                pending_copies: &mut pending,
            };
            w.person(&person, partner.as_ref(), &mut seen);
            if rows.len() >= options.rows_per_file {
                write_part(out, &folder, &mut part, &mut rows, &mut summary).await?;
            }
        }
        if rows.len() > 0 {
            write_part(out, &folder, &mut part, &mut rows, &mut summary).await?;
        }
        bar.inc(1);
    }
    if !pending.is_empty() {
        // Copies made on the last day land in one more file, as a late redelivery would.
        let last = options.start + chrono::Days::new(options.days.saturating_sub(1) as u64);
        let folder = out.child("events").join(format!("date={last}"));
        let mut rows = Rows::default();
        for copy in pending.drain(..) {
            rows.push(copy);
            summary.rows += 1;
            summary.duplicates += 1;
        }
        let mut part = 9000;
        write_part(out, &folder, &mut part, &mut rows, &mut summary).await?;
    }
    bar.finish_and_clear();
    summary.truth_rows = write_truth(out, options, &seen).await?;
    Ok(summary)
}

async fn write_part(
    out: &Place,
    folder: &ObjectPath,
    part: &mut usize,
    rows: &mut Rows,
    summary: &mut GenerateSummary,
) -> Result<()> {
    let batch = rows.take_batch()?;
    let bytes = parquet_bytes(event_schema(), &[batch])?;
    let path = folder.clone().join(format!("part-{:05}.parquet", *part));
    out.store.put(&path, PutPayload::from(bytes)).await?;
    *part += 1;
    summary.files += 1;
    Ok(())
}

async fn write_truth(out: &Place, options: &GenerateOptions, seen: &[u8]) -> Result<u64> {
    let mut types: Vec<&'static str> = Vec::new();
    let mut values: Vec<String> = Vec::new();
    let mut persons: Vec<i64> = Vec::new();
    for (index, &marks) in seen.iter().enumerate() {
        if marks == 0 {
            continue;
        }
        let p = Person::new(options.seed, index as u64, options.days);
        let mut add = |t: &'static str, v: &str| {
            types.push(t);
            values.push(v.to_string());
            persons.push(index as i64);
        };
        if marks & SEEN_USER_ID != 0 {
            add("user_id", p.user_id.as_deref().unwrap_or_default());
        }
        if marks & SEEN_EMAIL != 0 {
            add("email", p.email.as_deref().unwrap_or_default());
        }
        if marks & SEEN_PHONE != 0 {
            add("phone", p.phone.as_deref().unwrap_or_default());
        }
        for (device, (anon, _)) in p.devices.iter().enumerate() {
            if marks & (SEEN_DEVICE << device) != 0 {
                add("anonymous_id", anon);
            }
        }
    }
    let rows = types.len() as u64;
    let batch = RecordBatch::try_new(
        truth_schema(),
        vec![
            Arc::new(StringArray::from(types)) as ArrayRef,
            Arc::new(StringArray::from(values)) as ArrayRef,
            Arc::new(Int64Array::from(persons)) as ArrayRef,
        ],
    )?;
    let bytes = parquet_bytes(truth_schema(), &[batch])?;
    out.store
        .put(&out.child("truth.parquet"), PutPayload::from(bytes))
        .await?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_variants_normalise_back() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            let typed = typed_email(&mut rng, "ada.lovelace.7@example.com");
            assert_eq!(typed.trim().to_lowercase(), "ada.lovelace.7@example.com");
            let phone = typed_phone(&mut rng, "+14155550123");
            let digits: String = phone.chars().filter(char::is_ascii_digit).collect();
            assert!(digits == "14155550123" || digits == "4155550123", "{phone}");
        }
    }

    #[test]
    fn people_are_deterministic_and_distinct() {
        let a = Person::new(7, 3, 30);
        let b = Person::new(7, 3, 30);
        assert_eq!(a.devices, b.devices);
        assert_eq!(a.email, b.email);
        let c = Person::new(7, 4, 30);
        assert_ne!(a.devices[0].0, c.devices[0].0);
        let phones: std::collections::HashSet<_> = (0..5000)
            .filter_map(|i| Person::new(1, i, 30).phone)
            .collect();
        let with_phone = (0..5000)
            .filter(|&i| Person::new(1, i, 30).phone.is_some())
            .count();
        assert_eq!(
            phones.len(),
            with_phone,
            "phone numbers must be unique per person"
        );
    }
}
